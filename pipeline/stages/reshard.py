"""Stage 5, reshard: dedup survivors -> final WebDataset shards of a fixed size, seeded shuffle,
train/validation split.

The split is decided per sample from a hash of its key (so it never depends on partitioning).
Each dedup partition is a uniformly random subset of the data (hash partitioning), so shuffling
within a partition and numbering the shards partition after partition gives a shuffled dataset
while every partition is written independently (memory: one shard of images at a time). Shard
numbers are contiguous per split (train/000000.tar ...); only the last shard of each partition may
hold fewer than samples_per_shard samples. Tars (webdataset.TarWriter) are byte-deterministic (fixed
mtime/owner), each written under a temporary name and renamed after its sample index, so no
half-written tar ever has its final name and every tar under its final name has its index.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from common.atomic_files import atomic_write_text
from common.shard_folder import write_sample_index
from pipeline.settings import IngestConfig

META_FIELDS = ["url", "caption", "sha256", "width", "height", "original_width", "original_height"]


def split_of(key: str, val_fraction: float) -> bool:
    """True if the sample goes to the validation split; a pure function of the key."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h % 1_000_000 < round(val_fraction * 1_000_000)


def _split_keys(keys: List[str], cfg: IngestConfig) -> Dict[str, np.ndarray]:
    is_val = np.array([split_of(k, cfg.reshard.val_fraction) for k in keys], bool)
    return {cfg.reshard.train_split: np.flatnonzero(~is_val), cfg.reshard.val_split: np.flatnonzero(is_val)}


def plan(cfg: IngestConfig, work: Path) -> Dict:
    """Per split, the first global shard number of each partition (from row keys alone)."""
    S = cfg.reshard.samples_per_shard
    first: Dict[str, List[int]] = defaultdict(list)
    totals: Dict[str, int] = defaultdict(int)
    for q in range(cfg.dedup.partitions):
        keys = pq.read_table(work / "dedup" / "final" / f"q{q:04d}.parquet", columns=["row_key"])["row_key"]
        for split, rows in _split_keys(keys.to_pylist(), cfg).items():
            first[split].append(totals[split])
            totals[split] += math.ceil(len(rows) / S)
    return {"first_shard": dict(first), "num_shards": dict(totals)}


def _read_images(rows: List[dict], work: Path) -> Dict[str, bytes]:
    """Image bytes for rows, reading each source tar once, in offset order."""
    by_tar = defaultdict(list)
    for r in rows:
        by_tar[r["tar"]].append(r)
    images = {}
    for tar_name, members in sorted(by_tar.items()):
        with open(work / "download" / tar_name, "rb") as f:
            for r in sorted(members, key=lambda r: r["offset"]):
                f.seek(r["offset"])
                images[r["row_key"]] = f.read(r["size"])
    return images


def write_shard(path: Path, rows: List[dict], images: Dict[str, bytes], ext: str, extra: List[str]) -> str:
    """Write one tar atomically, with its sample index (common.shard_folder.write_sample_index) beside it;
    returns the tar's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # Byte-deterministic: TarWriter's defaults stamp each member with time.time() (a float, hence a pax
    # header per member) and user "bigdata"; a fixed integer mtime and empty names make reruns identical.
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0, user="", group="", mode=0o444) as tar:
        for r in rows:
            key = r["row_key"]
            meta = {"key": key, **{f: r.get(f) for f in META_FIELDS}, **{c: r.get(c) for c in extra}}
            # TarWriter writes a sample's members sorted by extension (json, image, txt).
            tar.write({"__key__": key, ext: images[key], "txt": r["caption"].encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    # The sample index first, the tar last: a tar under its final name always has its index.
    write_sample_index(tmp, index_path(path))
    tmp.replace(path)
    return digest


def index_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def reshard_partition(q: int, cfg: IngestConfig, work: Path, out: Path, shard_plan: Dict) -> Dict:
    marker = work / "reshard" / f"q{q:04d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    table = pq.read_table(work / "dedup" / "final" / f"q{q:04d}.parquet")
    rows = table.to_pylist()
    S = cfg.reshard.samples_per_shard
    ext = cfg.download.encode_format
    rng = np.random.default_rng([cfg.reshard.seed, q])
    result: Dict[str, List[dict]] = {}
    for split, idx in _split_keys([r["row_key"] for r in rows], cfg).items():
        # Sort by key before shuffling: the order of rows in the parquet must not matter.
        idx = np.array(sorted(idx, key=lambda i: rows[i]["row_key"]), dtype=np.int64)
        idx = idx[rng.permutation(len(idx))]
        shards = []
        for i, start in enumerate(range(0, len(idx), S)):
            chunk = [rows[j] for j in idx[start:start + S]]
            name = f"{split}/{shard_plan['first_shard'][split][q] + i:06d}.tar"
            digest = write_shard(out / name, chunk, _read_images(chunk, work), ext, list(cfg.input.keep_columns))
            # The shard-format contract (common.shard_folder): readers take the image extension from here.
            shards.append({"path": name, "num_samples": len(chunk), "sha256": digest, "image_ext": ext,
                           "sample_hash": cfg.download.compute_hash or "", "index": name[:-len(".tar")] + ".idx"})
        if shards:  # a split with no samples (val_fraction=0) gets no entry
            result[split] = shards
    atomic_write_text(marker, json.dumps(result, indent=1))
    return result
