"""One existing shard of ``python -m pipeline index`` (pipeline/index.py): where it is, how many samples it holds,
its image extension, and (when scanned) its sample index; plus the ``--subset`` id lists.

Counts, cheapest first: img2dataset/DataComp's ``{shard}_stats.json`` beside the tar (``successes``), open_clip's
``sizes.json`` in its folder, else a scan of the tar headers. A counted shard is read only up to its first
image member's header (the image extension); a scanned one is read once, streamed (remote: into a temporary
file under the output folder, deleted after the scan). Nothing is ever written beside a shard.

Rules a shard is checked against (``common.shard_folder``), each a skipped shard with one line saying the rule:
member extensions in any case (``KEY.JPG`` is a jpg, as webdataset lower-cases them); members whose keys run
together because of dots in the file names (``2024.05.12_000001.jpg``: webdataset's key ends at the first dot);
compression by magic bytes, whatever the name: gzip, bzip2 and xz are scanned through a decompressed temporary
copy (the sample index then holds offsets into the decompressed tar, as the loader reads it), others refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Set

import numpy as np

from common.errors import InputError
from common.shard_folder import (IMAGE_EXTS, KEY_EXT, READABLE_COMPRESSIONS, Inflater, compression_of,
                                 dotted_key_error, dotted_key_member, save_sample_index, unreadable_compression)

CHUNK = 1 << 20
FIRST_MEMBERS = 16
"""Members of a counted shard's first sample read at most (enough to see its image or that its keys ran together)."""


class Unusable(Exception):
    """This shard cannot be indexed (not a tar, no image, unreadable): it is skipped and counted."""


def is_pipe(location: str) -> bool:
    return location.startswith("pipe:")


def is_remote(location: str) -> bool:
    return is_pipe(location) or "://" in location and not location.startswith("file://")


def open_stream(location: str, storage_options: Optional[dict] = None, block_size: int = 1 << 16):
    """A readable binary stream of a local path, fsspec URL or ``pipe:`` command (the caller closes it)."""
    if is_pipe(location):
        proc = subprocess.Popen(location[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return _Pipe(proc)
    if not is_remote(location):
        return open(location.removeprefix("file://"), "rb")
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(location, **(storage_options or {}))
    # http(s): stream the body (no range requests, which plain servers do not answer); others: small blocks
    http = location.startswith(("http://", "https://"))
    return fs.open(path, "rb", block_size=0 if http else block_size)


class _Pipe:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdout.close()
        if self.proc.poll() is None:  # stopped reading early (first_image_ext): the command is not needed
            self.proc.kill()
        self.proc.wait()


def read_text(location: str, storage_options: Optional[dict]) -> Optional[str]:
    """The text of a small file beside a shard, or None when it is absent or unreadable."""
    try:
        with open_stream(location, storage_options) as f:
            return f.read().decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError):  # FileNotFoundError, HTTP 404 (fsspec: FileNotFoundError)
        return None
    except Exception:  # noqa: BLE001 - an fsspec backend's own error for a missing object: treat as absent
        return None


def split_member(name: str):
    """webdataset's (key, extension) of a tar member name (``common.shard_folder.KEY_EXT``)."""
    match = KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def image_ext_of(exts) -> str:
    for ext in exts:
        if ext.lower() in IMAGE_EXTS:
            return ext.lower()
    return ""


def first_image_ext(location: str, storage_options: Optional[dict]) -> str:
    """The image extension of the shard's first sample, reading the tar only up to that member's header."""
    key, exts = None, []
    try:
        with open_stream(location, storage_options) as f:
            compression = compression_of(f.read(6))
        if compression and compression not in READABLE_COMPRESSIONS:
            raise Unusable(str(unreadable_compression("", compression)))
        with open_stream(location, storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name, ext = split_member(member.name)
                if key is not None and name != key or len(exts) >= FIRST_MEMBERS:
                    break
                key = name
                if member.isfile():
                    exts.append(ext)
                    if image_ext_of([ext]):
                        return image_ext_of([ext])
    except Unusable:
        raise
    except (tarfile.TarError, EOFError) as err:
        raise Unusable(f"not a tar ({err})") from None
    except FileNotFoundError:
        raise Unusable("not found") from None
    except Exception as err:  # noqa: BLE001 - any backend's read error: this shard is unreadable
        raise Unusable(f"unreadable ({type(err).__name__}: {err})") from None
    dotted = dotted_key_member(exts) if key is not None else None
    if dotted is not None:
        raise Unusable(str(dotted_key_error("", key, dotted)))
    raise Unusable("no image member in its first sample" if key is not None else "not a tar (no members)")


@dataclass
class Scan:
    rows: np.ndarray
    """(n, 2) int64 start/end byte per sample, as ``common.shard_folder.index_tar``."""
    keys: list
    uids: list
    image_exts: list
    sha256: str


def scan_tar(path: str, want_uid: bool, sha256: str = "") -> Scan:
    """``index_tar``'s rows of a local (plain) tar, with each sample's key, image extension and (``want_uid``) the
    ``uid`` of its .json member; ``sha256`` the stored file's when ``path`` is a decompressed copy. Unusable when
    its members ran together (keys with dots)."""
    size = os.path.getsize(path)
    rows, keys, uids, exts, key, members = [], [], [], [], None, []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                end = member.offset_data + ((member.size + 511) // 512) * 512
                if not member.isfile() or member.offset_data + member.size > size:
                    continue
                name, ext = split_member(member.name)
                if name != key:
                    _check_keys(key, members)
                    members = []
                    rows.append([member.offset, end])
                    keys.append(name)
                    uids.append("")
                    exts.append("")
                    key = name
                else:
                    rows[-1][1] = end
                members.append(ext)
                if not exts[-1]:
                    exts[-1] = image_ext_of([ext])
                if want_uid and ext.lower() == "json":
                    try:
                        uid = json.loads(tar.extractfile(member).read()).get("uid", "")
                        uids[-1] = str(uid).lower() if uid else ""
                    except (ValueError, AttributeError):
                        pass
    except (tarfile.TarError, EOFError, OSError) as err:
        if not rows:
            raise Unusable(f"not a tar ({err})") from None
    _check_keys(key, members)
    return Scan(np.asarray(rows, dtype=np.int64).reshape(-1, 2), keys, uids, exts, sha256 or _sha256(path))


def _check_keys(key: Optional[str], exts: list) -> None:
    dotted = dotted_key_member(exts) if key is not None else None
    if dotted is not None:
        raise Unusable(str(dotted_key_error("", key, dotted)))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(location: str, storage_options: Optional[dict], tmp_dir: Path):
    """(path, is_temporary, sha256 of the stored file or ''): the local plain tar, or a streamed temporary copy
    of a remote or compressed one (decompressed on the way; its sha256 is of the bytes as stored, which is what
    the loader verifies a download against)."""
    if not is_remote(location):
        path = location.removeprefix("file://")
        if not os.path.isfile(path):
            raise Unusable("not found")
        with open(path, "rb") as f:
            if not compression_of(f.read(6)):
                return path, False, ""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".tar")
    digest, inflater, first = hashlib.sha256(), None, True
    try:
        with os.fdopen(fd, "wb") as out, open_stream(location, storage_options, block_size=CHUNK) as src:
            while chunk := src.read(CHUNK):
                if first and compression_of(chunk):
                    if compression_of(chunk) not in READABLE_COMPRESSIONS:
                        raise Unusable(str(unreadable_compression("", compression_of(chunk))))
                    inflater = Inflater(compression_of(chunk))
                first = False
                digest.update(chunk)
                out.write(inflater.feed(chunk) if inflater else chunk)
            if is_pipe(location) and src.proc.wait() != 0:
                raise Unusable(f"pipe command exited with {src.proc.returncode}")
    except Unusable:
        os.unlink(tmp)
        raise
    except FileNotFoundError:
        os.unlink(tmp)
        raise Unusable("not found") from None
    except Exception as err:  # noqa: BLE001 - network, 404, permission, damaged compression: unreadable
        os.unlink(tmp)
        raise Unusable(f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return tmp, True, digest.hexdigest()


# ---------------------------------------------------------------- counts beside the shard
def sibling(location: str, name: str) -> str:
    """``name`` in the folder of ``location`` (a path or URL)."""
    if is_remote(location):
        return posixpath.join(location.rsplit("/", 1)[0], name)
    return os.path.join(os.path.dirname(location.removeprefix("file://")), name)


def stem(location: str) -> str:
    base = location.rsplit("/", 1)[-1]
    for suffix in (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


class SizesCache:
    """open_clip's ``sizes.json`` of each shard folder, read once per folder."""

    def __init__(self, storage_options: Optional[dict]):
        self.storage_options, self.lock, self.folders = storage_options, threading.Lock(), {}

    def get(self, location: str) -> Optional[int]:
        folder = sibling(location, "")
        with self.lock:
            if folder not in self.folders:
                text = read_text(sibling(location, "sizes.json"), self.storage_options)
                try:
                    self.folders[folder] = json.loads(text) if text else {}
                except ValueError:
                    self.folders[folder] = {}
            sizes = self.folders[folder]
        value = sizes.get(location.rsplit("/", 1)[-1]) if isinstance(sizes, dict) else None
        return value if type(value) is int and value >= 0 else None


def stats_count(location: str, storage_options: Optional[dict]) -> Optional[int]:
    text = read_text(sibling(location, f"{stem(location)}_stats.json"), storage_options)
    try:
        value = json.loads(text).get("successes") if text else None
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int and value >= 0 else None


def parquet_uids(location: str, storage_options: Optional[dict]) -> Dict[str, str]:
    """{key: uid} from DataComp's ``{shard}.parquet`` beside the tar (columns key and uid), or {}."""
    try:
        import pyarrow.parquet as pq

        with open_stream(sibling(location, f"{stem(location)}.parquet"), storage_options, CHUNK) as f:
            table = pq.read_table(f, columns=["key", "uid"])
    except Exception:  # noqa: BLE001 - absent, or no such columns: the .json members are read instead
        return {}
    return {str(k): str(u).lower() for k, u in zip(table["key"].to_pylist(), table["uid"].to_pylist()) if u}


# ---------------------------------------------------------------- --subset
class Subset:
    """The samples to keep: keys (member basenames) and DataComp uids (32 hex digits, held as sorted 16-byte
    values so that a billion-id list fits in 16 GB, not a Python set)."""

    def __init__(self, ids):
        strings = [str(i).strip().lower() for i in ids if str(i).strip()]
        hexes = [s for s in strings if len(s) == 32 and all(c in "0123456789abcdef" for c in s)]
        self.keys: Set[str] = set(strings) - set(hexes)
        self.uids = np.unique(np.asarray([bytes.fromhex(h) for h in hexes], dtype="S16"))
        self.listed = len(self.keys) + len(self.uids)

    @classmethod
    def from_uid_pairs(cls, pairs: np.ndarray) -> "Subset":
        out = cls([])
        be = np.empty((len(pairs), 2), dtype=">u8")
        be[:] = pairs
        out.uids = np.unique(be.view("S16").ravel())
        out.listed = len(out.uids)
        return out

    def has_uid(self, uid: str) -> bool:
        if len(uid) != 32 or not len(self.uids):
            return False
        try:
            value = np.asarray([bytes.fromhex(uid)], dtype="S16")
        except ValueError:
            return False
        i = int(np.searchsorted(self.uids, value)[0])
        return i < len(self.uids) and self.uids[i] == value[0]

    def keeps(self, key: str, uid: str) -> bool:
        return key.rsplit("/", 1)[-1].lower() in self.keys or self.has_uid(uid) or (uid in self.keys)


def load_subset(path: str) -> Subset:
    """A ``--subset`` file: DataComp's .npy of uids (``[('uid', 'u8', 2)]``, ``u8,u8`` pairs, (n, 2) uint64 or
    hex strings), a .parquet with a ``uid`` or ``key`` column, or text with one id per line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--subset {path}: no such file")
    try:
        if file.suffix == ".npy":
            return _npy_subset(np.load(file, allow_pickle=False))
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            column = next((c for c in ("uid", "key") if c in table.column_names), None)
            if column is None:
                raise InputError(f"--subset {path}: a parquet subset needs a 'uid' or 'key' column "
                                 f"(has: {', '.join(table.column_names)})")
            return Subset(table[column].to_pylist())
        return Subset(file.read_text(encoding="utf-8-sig").splitlines())
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the parser says about a file that is not a subset
        raise InputError(f"--subset {path}: not a subset file ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}): expected DataComp's .npy of uids, a .parquet "
                         "with a uid or key column, or text with one id per line") from None


def _npy_subset(arr: np.ndarray) -> Subset:
    if arr.dtype.names:  # DataComp: [('uid', '<u8', (2,))] or two u8 fields (hi, lo)
        fields = [arr[name] for name in arr.dtype.names]
        pairs = fields[0] if len(fields) == 1 else np.stack(fields[:2], axis=-1)
        return Subset.from_uid_pairs(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2))
    if arr.dtype.kind in "ui" and arr.ndim == 2 and arr.shape[1] == 2:
        return Subset.from_uid_pairs(arr.astype(np.uint64))
    if arr.dtype.kind in "US":
        return Subset([a.decode() if isinstance(a, bytes) else a for a in arr.ravel().tolist()])
    raise ValueError(f"an array of {arr.dtype} {arr.shape}")


# ---------------------------------------------------------------- one shard
@dataclass
class Job:
    storage_options: Optional[dict]
    out: Path
    index_rel: str
    """Relative path under ``out`` of the sample index a scan writes ({} = the shard's position)."""
    subset: Optional[Subset]
    sizes: SizesCache


def index_shard(position: int, location: str, job: Job) -> dict:
    """The progress record of one shard: {i, path, num_samples, image_ext, index, sha256, source, kept_ids}
    or {i, path, skipped: reason}."""
    record = {"i": position, "path": location}
    try:
        record.update(_count(position, location, job))
    except Unusable as err:
        record["skipped"] = str(err)
    return record


def _count(position: int, location: str, job: Job) -> dict:
    if job.subset is None and not is_pipe(location):
        for source, count in (("stats", lambda: stats_count(location, job.storage_options)),
                              ("sizes", lambda: job.sizes.get(location))):
            n = count()
            if n is not None:
                ext = first_image_ext(location, job.storage_options)
                return {"num_samples": n, "image_ext": ext, "index": "", "sha256": "", "source": source}
    path, temporary, sha256 = local_copy(location, job.storage_options, job.out / ".tmp")
    try:
        uids = parquet_uids(location, job.storage_options) if job.subset is not None and not is_pipe(location) \
            else {}
        scan = scan_tar(path, want_uid=job.subset is not None and not uids, sha256=sha256)
    finally:
        if temporary:
            os.unlink(path)
    keep = np.ones(len(scan.keys), dtype=bool)
    if job.subset is not None:
        keep = np.asarray([job.subset.keeps(k, uids.get(k.rsplit("/", 1)[-1]) or u)
                           for k, u in zip(scan.keys, scan.uids)], dtype=bool)
    exts = [e for e, k in zip(scan.image_exts, keep) if e and k] or [e for e in scan.image_exts if e]
    if not exts:
        raise Unusable("no image member" if len(scan.keys) else "not a tar (no members)")
    rel = job.index_rel.format(f"{position:06d}")
    save_sample_index(scan.rows[keep], job.out / rel)
    return {"num_samples": int(keep.sum()), "image_ext": sorted(set(exts), key=lambda e: (-exts.count(e), e))[0], "index": rel,
            "sha256": scan.sha256, "source": "subset" if job.subset is not None else "scan",
            **({"kept_ids": int(keep.sum())} if job.subset is not None else {})}
