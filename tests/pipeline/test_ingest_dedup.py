"""Partitioned dedup (URL pass, then content pass) against a naive whole-dataset reference,
with forced small partition counts: the survivors must not depend on the partitioning."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages.dedup import reduce_content, reduce_url, scatter_part
from pipeline.run import run_dedup
from pipeline.settings import IngestConfig


def _make_parts(work, n_parts=3, rows_per_part=400, seed=0):
    """Filter-stage outputs with planted URL duplicates, content duplicates, both, and null hashes."""
    rng = random.Random(seed)
    rows = []
    for part in range(n_parts):
        table = []
        for i in range(rows_per_part):
            key = f"{part:05d}{i:09d}"
            url = f"http://h.test/{rng.randrange(900)}.jpg"        # ~ collisions across parts
            sha = None if rng.random() < 0.05 else f"{rng.randrange(700):064x}"  # content collisions
            table.append({"row_key": key, "url": url, "sha256": sha, "caption": "c", "tar": "t", "offset": 0,
                          "size": 1})
        rows.extend(table)
        (work / "filter").mkdir(parents=True, exist_ok=True)
        rng.shuffle(table)  # the order rows sit in a file must not matter
        pq.write_table(pa.Table.from_pylist(table), work / "filter" / f"part-{part:05d}.parquet")
        # the filter stage's completion marker, written last (dedup refuses to start without it)
        (work / "filter" / f"part-{part:05d}.json").write_text(json.dumps({"part": part, "kept": len(table)}))
    return rows


def naive_dedup(rows):
    """The definition: by key order, drop a row whose URL was seen; then among the survivors,
    drop a row whose (non-null) hash was seen."""
    seen_url, after_url = set(), []
    for r in sorted(rows, key=lambda r: r["row_key"]):
        if r["url"] not in seen_url:
            seen_url.add(r["url"])
            after_url.append(r)
    seen_sha, survivors = set(), []
    for r in after_url:
        if r["sha256"] is None or r["sha256"] not in seen_sha:
            seen_sha.add(r["sha256"])
            survivors.append(r["row_key"])
    return set(survivors), len(rows) - len(after_url), len(after_url) - len(survivors)


@pytest.mark.parametrize("partitions", [1, 2, 5])
def test_partitioned_dedup_equals_naive(tmp_path, partitions):
    rows = _make_parts(tmp_path)
    cfg = IngestConfig()
    cfg.dedup.partitions = partitions
    cfg.num_workers = 1
    run_dedup(3, cfg, tmp_path)
    survivors = set()
    for q in range(partitions):
        survivors |= set(pq.read_table(tmp_path / "dedup" / "final" / f"q{q:04d}.parquet")["row_key"].to_pylist())
    expected, dup_url, dup_content = naive_dedup(rows)
    assert dup_url > 100 and dup_content > 50  # the data really has both kinds
    assert survivors == expected
    got_url = sum(json.loads((tmp_path / "dedup" / "by_url" / f"_reduced-p{p:04d}.json").read_text())["duplicate_url"]
                  for p in range(partitions))
    got_content = sum(json.loads((tmp_path / "dedup" / "final" / f"q{q:04d}.json").read_text())["duplicate_content"]
                      for q in range(partitions))
    assert (got_url, got_content) == (dup_url, dup_content)


def test_each_partition_holds_only_its_hash_range(tmp_path):
    _make_parts(tmp_path, n_parts=2)
    cfg = IngestConfig()
    cfg.dedup.partitions = 3
    for part in range(2):
        scatter_part(part, cfg, tmp_path)
    urls_by_partition = [set(pq.read_table(tmp_path / "dedup" / "by_url" / f"p{p:04d}").column("url").to_pylist())
                         for p in range(3)]
    assert all(a.isdisjoint(b) for i, a in enumerate(urls_by_partition) for b in urls_by_partition[i + 1:])
    for p in range(3):
        reduce_url(p, 2, cfg, tmp_path)
    shas = [set(pq.read_table(tmp_path / "dedup" / "by_sha" / f"q{q:04d}").column("sha256").to_pylist()) - {None}
            for q in range(3)]
    assert all(a.isdisjoint(b) for i, a in enumerate(shas) for b in shas[i + 1:])


def test_reduce_refuses_to_run_before_all_scatters(tmp_path):
    _make_parts(tmp_path, n_parts=2)
    cfg = IngestConfig()
    cfg.dedup.partitions = 2
    scatter_part(0, cfg, tmp_path)
    with pytest.raises(RuntimeError, match="expected 2 inputs, found 1"):
        reduce_url(0, 2, cfg, tmp_path)


def test_disabled_passes_keep_everything(tmp_path):
    rows = _make_parts(tmp_path, n_parts=1)
    cfg = IngestConfig()
    cfg.dedup.partitions = 2
    cfg.dedup.by_url = cfg.dedup.by_content = False
    cfg.num_workers = 1
    run_dedup(1, cfg, tmp_path)
    kept = sum(reduce_content(q, cfg, tmp_path)["kept"] for q in range(2))
    assert kept == len(rows)
