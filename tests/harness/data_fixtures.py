"""Data fixtures of the tests: the sklearn-digits dataset (benchmarks/digits.py, shared with the trainer
benchmarks), a damaged copy of it, the keys a plain tarfile + PIL reader finds readable, and a copy with the
ingestion's per-shard sample indexes."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from PIL import Image

from benchmarks.digits import CLASS_NAMES, TEMPLATES, make_digits_dataset  # noqa: F401 (the tests import them here)
from common.shard_folder import Manifest, read_manifest, write_manifest, write_sample_index


def corrupt_copy(folder: Path, dest: Path) -> Path:
    """A copy of a dataset folder whose train shard 0 has one undecodable JPEG (400 bytes zeroed from its
    first JPEG marker) and whose train shard 1 is truncated to a third."""
    shutil.copytree(folder, dest)
    shard0 = dest / "train" / "000000.tar"
    raw = bytearray(shard0.read_bytes())
    jpeg_at = raw.find(b"\xff\xd8\xff")
    raw[jpeg_at:jpeg_at + 400] = b"\x00" * 400
    shard0.write_bytes(bytes(raw))
    shard1 = dest / "train" / "000001.tar"
    shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 3])
    return dest


def readable_keys(folder: Path, split: str = "train") -> set:
    """Reference: keys whose image and caption read and decode, by plain tarfile + PIL."""
    good = set()
    for path in read_manifest(folder).shard_paths(split):
        members = {}
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError):
            pass  # truncated: keep what was read before the cut
        for key, parts in members.items():
            try:
                Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
                if parts["txt"].decode().strip():
                    good.add(key)
            except Exception:
                continue
    return good


def with_sample_indexes(src: Path, dest: Path) -> Path:
    """A copy of ``src`` whose manifest lists a sample index per shard, as the ingestion writes it."""
    shutil.copytree(src, dest)
    manifest = read_manifest(dest)
    for split in manifest.splits.values():
        for info in split.shards:
            info.index = info.path[:-4] + ".idx"
            write_sample_index(dest / info.path, dest / info.index)
    write_manifest(dest, Manifest(splits=manifest.splits, fields=manifest.fields))
    return dest
