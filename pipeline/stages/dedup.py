"""Dedup: exact duplicates by URL *before download* (pass 0), then by image content hash after it.

Pass 0 runs between the input and the download stage, so a duplicate URL costs no request:

  scatter_input_urls(part)  input/part-P.parquet (row_key, url) -> pre_url/pXXXX/part-P.parquet
  reduce_input_urls(p)      pre_url/pXXXX/*  -> pre_url/dups-pXXXX.parquet (row keys to skip)
  duplicate_keys(part)      the row keys of part P that the download stage skips

The passes below run after download (the URL pass there finds nothing pass 0 left, unless URL
dedup was off before download and on after; it stays so the stages keep one shape):

Columnar (pyarrow) over the filter stage's metadata; images are never re-read. Two map/reduce
passes, each hash-partitioned so that a reduce task holds one partition in memory and the
partitions run independently (in parallel here, or as SLURM array tasks at billions of rows):

  scatter_part(part)      filter/part-P.parquet  -> by_url/pXXXX/part-P.parquet   (by hash(url))
  reduce_url(p)           by_url/pXXXX/*         -> by_sha/qYYYY/url-pXXXX.parquet (survivors, by sha256 prefix)
  reduce_content(q)       by_sha/qYYYY/*         -> final/qYYYY.parquet

In each group of equal URL (then equal hash) the row with the smallest row key survives, so the
result does not depend on partitioning or on the order the tasks ran in. Content dedup runs on
the URL survivors: a removed row never removes another row. Every output is written under a
temporary name and renamed; each task's .json marker is written last.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic_files import atomic_path, atomic_write_text
from pipeline.settings import IngestConfig


def url_partition(urls: List[str], partitions: int) -> np.ndarray:
    # blake2b: stable across processes and Python versions (unlike hash()).
    return np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") % partitions
                     for u in urls], dtype=np.int64)


def content_partition(hashes: List[str | None], partitions: int) -> np.ndarray:
    # Rows without a hash cannot be content-duplicates; spread them by nothing in particular.
    return np.array([int(h[:12], 16) % partitions if h else 0 for h in hashes], dtype=np.int64)


def _write(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _scatter(table: pa.Table, buckets: np.ndarray, partitions: int, path_of) -> None:
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    bounds = np.searchsorted(sorted_buckets, np.arange(partitions + 1))
    for p in range(partitions):
        _write(table.take(pa.array(order[bounds[p]:bounds[p + 1]])), path_of(p))


def scatter_part(part: int, cfg: IngestConfig, work: Path) -> None:
    """Map of pass 1: one filtered part into the URL partitions (empty files included, so that a
    reduce task can tell it has all its inputs)."""
    marker = work / "dedup" / "by_url" / f"_scattered-{part:05d}.json"
    if marker.exists():
        return
    table = pq.read_table(work / "filter" / f"part-{part:05d}.parquet")
    P = cfg.dedup.partitions
    buckets = url_partition(table["url"].to_pylist(), P) if table.num_rows else np.zeros(0, np.int64)
    _scatter(table, buckets, P, lambda p: work / "dedup" / "by_url" / f"p{p:04d}" / f"part-{part:05d}.parquet")
    atomic_write_text(marker, json.dumps({"part": part, "rows": table.num_rows}))


def scatter_input_urls(part: int, cfg: IngestConfig, work: Path) -> None:
    """Map of pass 0: the (row_key, url) of one normalised input part into the URL partitions."""
    folder = work / "dedup" / "pre_url"
    marker = folder / f"_scattered-{part:05d}.json"
    if marker.exists():
        return
    table = pq.read_table(work / "input" / f"part-{part:05d}.parquet", columns=["row_key", "url"])
    P = cfg.dedup.partitions
    buckets = url_partition(table["url"].to_pylist(), P) if table.num_rows else np.zeros(0, np.int64)
    _scatter(table, buckets, P, lambda p: folder / f"p{p:04d}" / f"part-{part:05d}.parquet")
    atomic_write_text(marker, json.dumps({"part": part, "rows": table.num_rows}))


def reduce_input_urls(p: int, n_parts: int, cfg: IngestConfig, work: Path) -> Dict:
    """Reduce of pass 0: in partition p, every row whose URL a smaller row key also has."""
    folder = work / "dedup" / "pre_url"
    marker = folder / f"_reduced-p{p:04d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    table = _read_bucket(folder / f"p{p:04d}", n_parts)
    if table.num_rows and cfg.dedup.by_url:
        dups = table.filter(pa.array(~_first_of_each_group(table, "url"))).select(["row_key"])
        dups = dups.sort_by("row_key")
    else:
        dups = pa.table({"row_key": pa.array([], pa.string())})
    _write(dups, folder / f"dups-p{p:04d}.parquet")
    result = {"partition": p, "rows": table.num_rows, "duplicate_url": dups.num_rows}
    atomic_write_text(marker, json.dumps(result))
    return result


def duplicate_keys(part: int, cfg: IngestConfig, work: Path) -> pa.Array:
    """Row keys of ``part`` that pass 0 found to repeat an earlier URL (memory: this part's)."""
    folder = work / "dedup" / "pre_url"
    prefix = f"{part:05d}"
    keys = []
    for p in range(cfg.dedup.partitions):
        if not (folder / f"_reduced-p{p:04d}.json").exists():
            raise FileNotFoundError(f"URL dedup before download has not run for partition {p} "
                                    f"({folder}); run `python -m pipeline parts` (or `run`) first")
        col = pq.read_table(folder / f"dups-p{p:04d}.parquet")["row_key"]
        keys.append(col.filter(pc.starts_with(col, prefix)))
    return pa.concat_arrays([k.combine_chunks() for k in keys]) if keys else pa.array([], pa.string())


def _first_of_each_group(table: pa.Table, column: str) -> np.ndarray:
    """Mask of rows that survive: the smallest row_key of each group of equal `column` values.
    Null values form no group (every such row survives)."""
    if table.num_rows == 0:
        return np.zeros(0, bool)
    order = pc.sort_indices(table, sort_keys=[(column, "ascending"), ("row_key", "ascending")]).to_numpy()
    values = table[column].take(pa.array(order))
    same_as_previous = np.zeros(table.num_rows, bool)
    if table.num_rows > 1:
        eq = pc.equal(values.slice(1), values.slice(0, table.num_rows - 1))
        same_as_previous[1:] = pc.fill_null(eq, False).to_numpy(zero_copy_only=False)  # null: never a dup
    keep = np.empty(table.num_rows, bool)
    keep[order] = ~same_as_previous
    return keep


def _read_bucket(folder: Path, n_expected: int) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    if len(files) != n_expected:
        raise RuntimeError(f"{folder}: expected {n_expected} inputs, found {len(files)}; run the previous step")
    tables = [pq.read_table(f) for f in files]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def reduce_url(p: int, n_parts: int, cfg: IngestConfig, work: Path) -> Dict:
    marker = work / "dedup" / "by_url" / f"_reduced-p{p:04d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    table = _read_bucket(work / "dedup" / "by_url" / f"p{p:04d}", n_parts)
    Q = cfg.dedup.partitions
    if table.num_rows:
        keep = _first_of_each_group(table, "url") if cfg.dedup.by_url else np.ones(table.num_rows, bool)
        survivors = table.filter(pa.array(keep))
        buckets = content_partition(survivors["sha256"].to_pylist(), Q)
    else:
        keep, survivors, buckets = np.zeros(0, bool), table, np.zeros(0, np.int64)
    if survivors.num_columns == 0:  # an empty bucket still writes one (empty) file per content partition
        survivors = pa.table({"row_key": pa.array([], pa.string())})
    _scatter(survivors, buckets, Q, lambda q: work / "dedup" / "by_sha" / f"q{q:04d}" / f"url-p{p:04d}.parquet")
    result = {"partition": p, "rows": table.num_rows, "duplicate_url": int((~keep).sum())}
    atomic_write_text(marker, json.dumps(result))
    return result


def reduce_content(q: int, cfg: IngestConfig, work: Path) -> Dict:
    marker = work / "dedup" / "final" / f"q{q:04d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    table = _read_bucket(work / "dedup" / "by_sha" / f"q{q:04d}", cfg.dedup.partitions)
    if table.num_rows:
        keep = _first_of_each_group(table, "sha256") if cfg.dedup.by_content else np.ones(table.num_rows, bool)
        survivors = table.filter(pa.array(keep))
    else:
        keep, survivors = np.zeros(0, bool), pa.table({"row_key": pa.array([], pa.string())})
    _write(survivors, work / "dedup" / "final" / f"q{q:04d}.parquet")
    result = {"partition": q, "rows": table.num_rows, "kept": survivors.num_rows,
              "duplicate_content": int((~keep).sum())}
    atomic_write_text(marker, json.dumps(result))
    return result
