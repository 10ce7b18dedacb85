"""The shard folder format: the interface between ingestion and training/evaluation.

A finished dataset folder looks like::

    OUT/
      manifest.json          # this module's Manifest, written last (its presence means "complete")
      summary.json           # row accounting of the run that built it (see pipeline/stages/summary.py)
      classnames.txt         # optional: one class name per line (classification sets)
      train/000000.tar ...   # WebDataset shards: {key}.{jpg|png|webp}, {key}.txt (caption), {key}.json (metadata)
      train/000000.idx ...   # each shard's sample index (.npy: start/end byte per sample; see write_sample_index)
      train.wids.json        # wids shard index of the split (for wids users; the trainer needs only the manifest)
      val/000000.tar ...
      val.wids.json

Sample keys are 14-digit strings, unique across the dataset and stable across reruns. The per-sample
``.json`` holds at least ``key``, ``url``, ``caption``, ``sha256``, ``width``, ``height`` and any extra
input columns the user asked to keep (the demo keeps ``label`` and ``class_name``).

The shard-format contract lives here, in ``Manifest.fields``: ``image`` is the image member's
extension the ingestion wrote (``download.encode_format``: jpg, png or webp), ``caption`` and
``metadata`` the other members, ``sample_hash`` the name of the per-sample content hash in the
metadata (``download.compute_hash``). Trainer and evaluator read these instead of assuming jpg.
The folder may also be a URL (http(s)://, s3://, gs://: read through fsspec) or a webdataset
``pipe:`` command with ``{}`` standing for the file to read (``pipe:curl -s http://host/ds/{}``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from common.atomic_files import atomic_path, atomic_write_text
from common.errors import InputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    path: str
    """Tar path relative to the dataset folder, or where the shard lives when it stays outside it (an index of
    existing shards, ``python -m pipeline index``): an absolute path, a URL (``file://``, ``http(s)://``,
    ``s3://``, ``gs://``) or a ``pipe:`` command."""
    num_samples: int
    sha256: str = ""
    """Checksum of the tar file (empty if not computed); remote readers verify downloads with it."""
    image_ext: str = ""
    """Extension of the image members in this tar (the ingestion's encode_format); empty: see Manifest.fields."""
    sample_hash: str = ""
    """Name of the per-sample content hash in each sample's metadata (e.g. sha256); empty if none."""
    index: str = ""
    """Relative path of the shard's sample index (``write_sample_index``); empty: readers scan the tar."""


@dataclass
class SplitInfo:
    shards: List[ShardInfo] = field(default_factory=list)
    wids_index: str = ""
    """Relative path of the split's wids index JSON."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass
class Manifest:
    splits: Dict[str, SplitInfo] = field(default_factory=dict)
    fields: Dict[str, str] = field(default_factory=lambda: {"image": "jpg", "caption": "txt", "metadata": "json"})
    seed: int = 0
    version: int = FORMAT_VERSION
    root: str = ""
    """Absolute folder the manifest was read from (not stored)."""

    def shard_paths(self, split: str) -> List[str]:
        """Absolute tar paths (or URLs, under a remote root or for shards indexed in place) of a split, in order."""
        return [locate(self.root, s.path) for s in self.split(split).shards]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in manifest {self.root}/{MANIFEST_NAME} "
                           f"(has: {sorted(self.splits)})")
        return self.splits[name]

    def wids_index_path(self, split: str) -> str:
        return os.path.join(self.root, self.split(split).wids_index)

    def classnames(self, storage_options: Optional[dict] = None) -> List[str] | None:
        """classnames.txt beside the manifest (local or remote), one name per line; None if there is none."""
        try:
            return read_text_at(str(self.root), "classnames.txt", storage_options).splitlines()
        except FileNotFoundError:
            return None


def _is_remote(root: str) -> bool:
    return root.startswith("pipe:") or ("://" in root and not root.startswith("file://"))


def is_absolute(location: str) -> bool:
    """True for a location that names its file by itself: an absolute path, a URL or a ``pipe:`` command."""
    return location.startswith(("/", "pipe:")) or "://" in location


def locate(root: str, rel: str) -> str:
    """Where ``rel`` (a manifest's shard or index path) is: ``rel`` itself when it is absolute (``is_absolute``;
    ``file://`` dropped), else under ``root`` (a folder, a URL, or a ``pipe:`` command whose ``{}`` is ``rel``)."""
    if is_absolute(rel):
        return rel.removeprefix("file://")
    if _is_remote(root):
        return _join_remote(root, rel)
    return os.path.join(root.removeprefix("file://"), rel)


def _join_remote(root: str, rel: str) -> str:
    if root.startswith("pipe:"):
        return root.replace("{}", rel) if "{}" in root else f"{root} {rel}"
    return f"{root.rstrip('/')}/{rel}"


def _read_remote_text(url: str, storage_options: Optional[dict]) -> str:
    if url.startswith("pipe:"):
        done = subprocess.run(url[5:], shell=True, capture_output=True)
        if done.returncode != 0:
            raise FileNotFoundError(f"{url} exited with {done.returncode}: {done.stderr.decode()[-300:]}")
        return done.stdout.decode()
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read().decode()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url} not found: not a finished dataset folder ({err})") from None


def read_text_at(root: str, rel: str, storage_options: Optional[dict] = None) -> str:
    """The text of ``rel`` under ``root`` (a folder, URL or ``pipe:`` command); FileNotFoundError if absent."""
    if _is_remote(root):
        return _read_remote_text(_join_remote(root, rel), storage_options)
    path = Path(root.removeprefix("file://")) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path.read_text()


def read_manifest(folder: str | os.PathLike, storage_options: Optional[dict] = None) -> Manifest:
    """Read ``folder/manifest.json``; ``folder`` may be a URL or a ``pipe:`` command (see the module doc)."""
    if _is_remote(str(folder)):
        root = str(folder)
        text = _read_remote_text(_join_remote(root, MANIFEST_NAME), storage_options)
        path = _join_remote(root, MANIFEST_NAME)
    else:
        root = Path(str(folder).removeprefix("file://")).resolve()
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a finished dataset folder (run `make shards` first)")
        text = path.read_text()
    return _parse_manifest(text, path, root)


class ManifestError(InputError):
    """manifest.json exists but is not a manifest (not JSON, wrong shape, missing keys); names the file."""


def _parse_manifest(text: str, path, root) -> Manifest:
    """Check the manifest's shape before use: a damaged file is one ManifestError naming what is wrong,
    never an AttributeError/KeyError deep in a reader."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path}: not a valid manifest: {what} (rebuild the dataset with `make shards`)")

    try:
        raw = json.loads(text)
    except ValueError as err:  # also a truncated file
        raise bad(f"not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("version") != FORMAT_VERSION:
        raise bad(f"unsupported manifest version {raw.get('version')!r} (this reader knows {FORMAT_VERSION})")
    if not isinstance(raw.get("splits"), dict):
        raise bad(f"'splits' must be an object of split name -> shards, got {raw.get('splits')!r:.60}")
    fields = raw.get("fields", {})
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise bad(f"'fields' must be an object of strings, got {fields!r:.60}")
    if not isinstance(raw.get("seed", 0), int):
        raise bad(f"'seed' must be an integer, got {raw.get('seed')!r:.60}")
    splits = {}
    for name, info in raw["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise bad(f"split '{name}' must be an object with a 'shards' list")
        shards = []
        for i, s in enumerate(info["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("path"), str) or not s["path"] \
                    or type(s.get("num_samples")) is not int or s["num_samples"] < 0:
                raise bad(f"split '{name}' shard {i} needs a 'path' string and a 'num_samples' integer >= 0, "
                          f"got {s!r:.80}")
            unknown = set(s) - set(ShardInfo.__dataclass_fields__)
            if unknown or not all(isinstance(s.get(k, ""), str) for k in ("sha256", "image_ext", "sample_hash", "index")):
                raise bad(f"split '{name}' shard {i} has unknown or non-string keys {sorted(unknown) or s!r:.80}")
            shards.append(ShardInfo(**s))
        if not isinstance(info.get("wids_index", ""), str):
            raise bad(f"split '{name}': 'wids_index' must be a path string")
        splits[name] = SplitInfo(shards=shards, wids_index=info.get("wids_index", ""))
    fields = {"image": "jpg", "caption": "txt", "metadata": "json", **fields}
    return Manifest(splits=splits, fields=fields, seed=raw.get("seed", 0), version=raw["version"], root=str(root))


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the split wids indexes, then manifest.json atomically (it marks the folder complete).

    ``fields['image']`` and ``fields['sample_hash']`` are taken from the shards when they record them
    (the ingestion's reshard does). Shards that disagree on their sample_hash are an error, not a guess;
    on their image extension (an index of shards made by other tools, ``python -m pipeline index``) the most
    common one is ``fields['image']`` and each shard keeps its own (readers fall back per sample:
    ``train.data.decode.image_member``).
    """
    folder = Path(folder)
    for name, attr in (("image", "image_ext"), ("sample_hash", "sample_hash")):
        found = Counter(getattr(s, attr) for split in manifest.splits.values() for s in split.shards)
        found.pop("", None)
        if len(found) > 1 and name == "sample_hash":
            raise ValueError(f"shards disagree on their {attr}: {sorted(found)}; one dataset has one format")
        if found:
            manifest.fields[name] = found.most_common(1)[0][0]
    for name, split in manifest.splits.items():
        split.wids_index = split.wids_index or f"{name}.wids.json"
        index = {"wids_version": 1, "name": name,
                 "shardlist": [{"url": s.path, "nsamples": s.num_samples} for s in split.shards]}
        atomic_write_text(folder / split.wids_index, json.dumps(index, indent=1))
    data = asdict(manifest)
    data.pop("root")
    for name, split in manifest.splits.items():
        data["splits"][name]["num_samples"] = split.num_samples
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(data, indent=1))


# ---------------------------------------------------------------- what a shard must be
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split of a member name
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image extensions a sample may hold (lower case: webdataset lower-cases extensions when it groups)."""


class ShardFormatError(ValueError):
    """A shard readers cannot use as it is (members whose keys run together, a compression no reader here
    decompresses); the message is one line: the shard, the rule and the fix."""


def dotted_key_member(exts) -> Optional[str]:
    """The extension (lower case) that shows a sample's members ran together, or None.

    webdataset's key of a member is its name up to the first dot of the file name (KEY_EXT), so members named
    ``2024.05.12_000001.jpg`` all get the key ``2024`` and extensions like ``05.12_000001.jpg``: one sample per
    shard that holds no plain image member. A sample with a plain image (``jpg``) and multi-part extensions
    beside it (``seg.png``) is a legitimate webdataset sample."""
    exts = [e.lower() for e in exts]
    if any(e in IMAGE_EXTS for e in exts):
        return None
    return next((e for e in exts if "." in e and e.rsplit(".", 1)[1] in IMAGE_EXTS), None)


def dotted_key_error(shard: str, key: str, ext: str) -> ShardFormatError:
    """The one-line refusal of a shard whose member ``key.ext`` has dots in its file name (dotted_key_member);
    ``shard`` '' leaves the shard's name out (the caller says it)."""
    base = key.rsplit("/", 1)[-1]
    name = f"{base}.{ext}"
    fixed = f"{name.rsplit('.', 1)[0].replace('.', '_')}.{name.rsplit('.', 1)[1]}"
    return ShardFormatError(f"{f'shard {shard}: ' if shard else ''}member '{name}' has dots in its key; webdataset "
                            f"keys end at the first dot of the file name (here '{base}'), so its samples run together: "
                            f"rename the members without dots before the extension (e.g. '{fixed}'; dots in folder "
                            "names are fine)")


COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
"""Magic bytes of the compressions a shard may carry (whatever its name says)."""
READABLE_COMPRESSIONS = ("gzip", "bzip2", "xz")
"""The ones readers decompress (Python's zlib, bz2, lzma; webdataset's tarfile reads the same three)."""


def compression_of(head: bytes) -> str:
    """The compression whose magic bytes ``head`` (a file's first bytes) starts with; '' for none (a tar)."""
    return next((name for magic, name in COMPRESSIONS if head.startswith(magic)), "")


def unreadable_compression(shard: str, compression: str) -> ShardFormatError:
    """The one-line refusal of a shard compressed with ``compression`` (not one of READABLE_COMPRESSIONS)."""
    return ShardFormatError(f"{f'shard {shard} is ' if shard else ''}{compression}-compressed, which no reader "
                            "here decompresses (gzip, "
                            f"bzip2 and xz are read): decompress the shards (`{compression} -d`) or recompress them "
                            "with gzip")


class Inflater:
    """Incremental decompression of a gzip, bzip2 or xz stream, concatenated members included."""

    def __init__(self, compression: str):
        import bz2
        import lzma
        import zlib

        self._make = {"gzip": lambda: zlib.decompressobj(wbits=31), "bzip2": bz2.BZ2Decompressor,
                      "xz": lzma.LZMADecompressor}[compression]
        self._d = self._make()

    def feed(self, data: bytes) -> bytes:
        """The decompressed bytes ``data`` completes (raises ValueError/OSError-like errors on a damaged stream)."""
        out = []
        while data:
            out.append(self._d.decompress(data))
            if not self._d.eof:
                break
            data = self._d.unused_data
            self._d = self._make()
            if not data.strip(b"\0"):  # zero padding after the last member (tape-style writers)
                break
        return b"".join(out)


# ---------------------------------------------------------------- per-shard sample index


def index_tar(f, shard: str = "") -> "np.ndarray":
    """(num_samples, 2) int64: start and end byte of each sample's members, in tar order.

    Members of one sample are adjacent (the WebDataset convention). ShardFormatError when members ran
    together because of dots in their keys (``dotted_key_member``); ``shard`` names the shard in it. A truncated tar yields the samples
    whose members are complete up to the cut; the cut sample keeps the members that survived.
    """
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    rows, key, exts = [], None, []
    name = shard or str(getattr(f, "name", "") or "?")
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                end = member.offset_data + ((member.size + 511) // 512) * 512
                if not member.isfile() or member.offset_data + member.size > file_size:
                    continue
                match = KEY_EXT.match(member.name)
                sample = match.group(1) if match else member.name
                if sample != key:
                    _check_keys(name, key, exts)
                    rows.append([member.offset, end])
                    key, exts = sample, []
                else:
                    rows[-1][1] = end
                exts.append(match.group(2) if match else "")
    except (tarfile.TarError, EOFError, OSError) as err:
        log.warning("tar index stops at a damaged or truncated spot (%s); %d samples indexed", err, len(rows))
    _check_keys(name, key, exts)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _check_keys(shard: str, key: Optional[str], exts: list) -> None:
    dotted = dotted_key_member(exts) if key is not None else None
    if dotted is not None:
        raise dotted_key_error(shard, key, dotted)


def write_sample_index(tar_path: str | os.PathLike, index_path: str | os.PathLike) -> Path:
    """Write ``index_tar`` of a tar as .npy (16 bytes per sample), atomically. Readers then fetch a
    shard's sample offsets instead of scanning its tar headers (no extra bytes read at training time)."""
    with open(tar_path, "rb") as f:
        return save_sample_index(index_tar(f), index_path)


def save_sample_index(rows: "np.ndarray", index_path: str | os.PathLike) -> Path:
    """Write an (n_samples, 2) int64 index as .npy, atomically."""
    with atomic_path(index_path) as tmp, open(tmp, "wb") as out:
        np.save(out, rows)
    return Path(index_path)


def load_sample_index(data: bytes) -> "np.ndarray":
    """Parse a sample index written by ``write_sample_index``; ValueError if it is not one."""
    # The .npy v1 layout parsed directly: np.load costs ~0.2 ms per call, which adds up over small shards.
    if data[:8] != b"\x93NUMPY\x01\x00":
        raise ValueError("not a sample index: no .npy v1 header")
    end = 10 + int.from_bytes(data[8:10], "little")
    header = data[10:end].decode("latin1")
    if "'descr': '<i8'" not in header or "'fortran_order': False" not in header or (len(data) - end) % 16:
        raise ValueError(f"not a sample index: {header.strip()}")
    return np.frombuffer(data, dtype="<i8", offset=end).reshape(-1, 2)
