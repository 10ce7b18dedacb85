"""Where shard bytes come from: local folders, http(s)/s3/gs/any fsspec URL, or webdataset ``pipe:`` commands.

Remote shards are copied whole into a bounded local cache (``data.cache_dir``, ``data.cache_limit_gb``),
least recently used first out. A download goes to a hidden temporary name and is renamed only once it
is complete (and, when the manifest records one, its sha256 matches): a crash mid-download never leaves
a half file under a final name. Processes of one node share the cache; a per-file lock makes one of
them download while the others wait. A failing source is retried with exponential backoff, then the
shard is reported unavailable (the loader skips and counts its samples).

Compressed shards (gzip, bzip2, xz: ``.tar.gz`` and the like, or a compressed stream under any name; found by
their magic bytes) are decompressed into the same cache on the way, remote ones as they download and local
ones on first use (keyed by path, size and mtime), because a sample is read by its byte offset in the tar.
That costs their uncompressed size in ``data.cache_dir``; ``gunzip`` them once to avoid it. Other
compressions (zstd) are refused in one line (``common.shard_folder.ShardFormatError``).

Each shard has a compact index of its samples (numpy: start and end byte of each sample's members;
the ingestion writes it beside the tar, see ``common.shard_folder.write_sample_index``; for shards
without one it is scanned once per node and shared through the cache dir), so a sample is one
``pread`` of exactly its bytes: reading a shard in any order costs the same bytes as streaming it.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from common.shard_folder import (KEY_EXT, READABLE_COMPRESSIONS, Inflater, ShardFormatError, compression_of,
                                 dotted_key_error, dotted_key_member, index_tar, locate, save_sample_index,
                                 unreadable_compression)

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class ShardUnavailable(RuntimeError):
    """A shard could not be fetched (after retries) or is not a readable tar."""


def is_remote(root: str) -> bool:
    return root.startswith("pipe:") or "://" in root and not root.startswith("file://")


def join(root: str, rel: str) -> str:
    """The location of ``rel`` under ``root`` (``common.shard_folder.locate``: ``rel`` itself when absolute)."""
    return locate(root, rel)


def open_remote(url: str, storage_options: Optional[dict] = None):
    """A readable binary stream for a URL or ``pipe:`` command (the caller closes it)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return _PipeStream(proc)
    import fsspec

    options = dict(storage_options or {})
    if url.startswith(("http://", "https://")):
        options.setdefault("block_size", 0)  # stream the body: no range requests, no 5 MB read-ahead blocks
    return fsspec.open(url, "rb", **options).open()


class _PipeStream(io.RawIOBase):
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.proc.stdout.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.wait() != 0:
                super().close()
                raise OSError(f"pipe command exited with status {self.proc.returncode}: {self.proc.args}")
        super().close()


class ShardCache:
    """Local copies of remote shards in ``cache_dir``, at most ``limit_bytes`` of them (LRU eviction)."""

    def __init__(self, cache_dir: str, limit_bytes: int, retries: int = 3, backoff_s: float = 1.0,
                 storage_options: Optional[dict] = None):
        self.dir = Path(cache_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / ".locks").mkdir(exist_ok=True)
        self.limit, self.retries, self.backoff_s = limit_bytes, retries, backoff_s
        self.storage_options = storage_options or {}
        self.bytes_downloaded = 0

    def name_of(self, url: str) -> str:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', url.rsplit('/', 1)[-1])[-80:]}"

    def get(self, url: str, sha256: str = "", key: str = "") -> str:
        """Local path of the shard at ``url`` (decompressed), downloading it first if needed; raises
        ShardUnavailable, or ShardFormatError for a compression no reader here decompresses. ``key`` names the
        content when the URL alone does not (a local compressed file: path, size and mtime)."""
        path = self.dir / self.name_of(key or url)
        with open(self.dir / ".locks" / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per file across workers and ranks of a node
            if not path.exists():
                self._download(url, path, sha256)
                self.evict(keep=path)
        os.utime(path)  # the LRU clock
        return str(path)

    def _download(self, url: str, path: Path, sha256: str) -> None:
        last = None
        for attempt in range(self.retries + 1):
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
            try:
                digest, size, inflater = hashlib.sha256(), 0, None
                with open_remote(url, self.storage_options) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)  # the checksum is the stored file's, compressed or not
                        if size == 0 and compression_of(chunk):
                            if compression_of(chunk) not in READABLE_COMPRESSIONS:
                                raise unreadable_compression(url, compression_of(chunk))
                            inflater = Inflater(compression_of(chunk))
                        size += len(chunk)
                        dst.write(inflater.feed(chunk) if inflater else chunk)
                if sha256 and digest.hexdigest() != sha256:
                    raise IOError(f"sha256 mismatch after {size} bytes (truncated or changed at the source)")
                os.replace(tmp, path)  # complete and verified: only now does it get its final name
                self.bytes_downloaded += size
                return
            except ShardFormatError:  # retrying does not change the file's format
                tmp.unlink(missing_ok=True)
                raise
            except Exception as err:  # network, HTTP status, pipe exit code, checksum, damaged compression
                last = err
                tmp.unlink(missing_ok=True)
                if attempt < self.retries:
                    delay = self.backoff_s * 2 ** attempt
                    log.warning("fetching %s failed (%s); retry %d/%d in %.1f s", url, err, attempt + 1,
                                self.retries, delay)
                    time.sleep(delay)
        raise ShardUnavailable(f"{url}: {self.retries + 1} attempts failed, last: {last}")

    def index(self, path: str, identity: str, counter: list, shard: str = "") -> np.ndarray:
        """``index_tar`` of a local tar, computed once per node: the processes that share this cache load
        it from ``.idx-<hash>.npy`` (16 bytes per sample; kept, not evicted). ``identity`` names the
        content (URL + sha256 for cached shards, path + size + mtime for local ones); ``shard`` names it in a
        ShardFormatError (members whose keys ran together), which is raised as it is."""
        name = f".idx-{hashlib.sha1(identity.encode()).hexdigest()[:24]}.npy"
        sidecar = self.dir / name
        try:
            with open(self.dir / ".locks" / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not sidecar.exists():
                    with CountingFile(path, counter) as f:
                        rows = index_tar(f, shard)
                    save_sample_index(rows, sidecar)
                    return rows
            counter[0] += sidecar.stat().st_size
            return np.load(sidecar)
        except (OSError, ValueError) as err:  # unwritable cache or damaged sidecar: index in memory instead
            if isinstance(err, ShardFormatError):
                raise
            log.warning("index sidecar %s unusable (%s); scanning the tar", sidecar, err)
            with CountingFile(path, counter) as f:
                return index_tar(f, shard)

    def evict(self, keep: Path) -> None:
        """Delete least recently used shards until the cache fits its limit (never ``keep``).

        Readers hold their shards open, and an unlinked open file stays readable on POSIX.
        """
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.dir.iterdir()
                 if p.is_file() and not p.name.startswith(".")]
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.limit:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


def check_shard(location: str, storage_options: Optional[dict] = None, members: int = 16) -> None:
    """ShardFormatError (one line) when the shard at ``location`` is compressed in a way no reader here reads,
    or the members of its first sample (up to ``members``) ran together because of dots in their keys.
    Anything else (missing, unreachable, damaged) is left to the loader, which skips and counts such samples;
    ``pipe:`` commands are not checked (the loader meets the same rules per shard)."""
    if location.startswith("pipe:"):
        return
    key, exts = None, []
    try:
        with (open_remote(location, storage_options) if is_remote(location) else open(location, "rb")) as f:
            compression = compression_of(f.read(6))
        if compression and compression not in READABLE_COMPRESSIONS:
            raise unreadable_compression(location, compression)
        with (open_remote(location, storage_options) if is_remote(location) else open(location, "rb")) as f, \
                tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                match = KEY_EXT.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if key is not None and match.group(1) != key or len(exts) >= members:
                    break
                key = match.group(1)
                exts.append(match.group(2))
    except ShardFormatError:
        raise
    except Exception:  # noqa: BLE001 - any read error: the loader's per-shard handling reports it
        return
    dotted = dotted_key_member(exts) if key is not None else None
    if dotted is not None:
        raise dotted_key_error(location, key, dotted)


def read_members(fd: int, start: int, end: int) -> Dict[str, bytes]:
    """The members of one sample: {'__key__': key, ext: bytes}, extensions lower-cased as webdataset does.

    Plain ustar headers are parsed here directly (a tarfile object per sample costs more than a
    small decode); anything else (pax or GNU long names) goes through tarfile.
    """
    region = os.pread(fd, end - start, start)
    sample: Dict[str, bytes] = {}
    pos = 0
    while pos + 512 <= len(region):
        header = region[pos:pos + 512]
        if header.count(0) == 512:
            break
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[257:262] not in (b"ustar", b"\0\0\0\0\0"):
            return _read_members_tarfile(region)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        match = KEY_EXT.match(f"{prefix}/{name}" if prefix else name)
        if pos + 512 + size > len(region):
            raise EOFError(f"member {name} cut short")
        if match is not None:
            sample["__key__"] = os.path.basename(match.group(1))
            sample[match.group(2).lower()] = region[pos + 512:pos + 512 + size]
        pos += 512 + (size + 511) // 512 * 512
    return sample


def _read_members_tarfile(region: bytes) -> Dict[str, bytes]:
    sample: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(region), mode="r:") as tar:
        for member in tar:
            match = KEY_EXT.match(member.name) if member.isfile() else None
            if match is not None:
                sample["__key__"] = os.path.basename(match.group(1))
                sample[match.group(2).lower()] = tar.extractfile(member).read()
    return sample


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it (read amplification accounting)."""

    def __init__(self, path: str, counter: list):
        self.f, self.counter, self.name = open(path, "rb", buffering=0), counter, path
        self.size = os.fstat(self.f.fileno()).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.counter[0] += n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        super().close()

