"""Stage 3, filter: img2dataset's per-shard metadata of one part -> WORK/filter/part-00003.parquet
(the rows that survive, with where their image bytes lie) + part-00003.json (counts; the marker).

Failed downloads become counted failure reasons; image rules (minimum side, aspect ratio) run on
the original sizes img2dataset recorded. Image bytes are located by reading tar headers only.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from wids.wids_mmtar import MMIndexedTar

from pipeline.stages.download import classify_failure, part_dir
from common.atomic_files import atomic_path, atomic_write_text
from pipeline.settings import IngestConfig, ImageRules

KEPT_COLUMNS = ["row_key", "url", "caption", "sha256", "width", "height", "original_width", "original_height"]


def tar_index(path: Path, ext: str) -> Dict[str, Tuple[int, int]]:
    """{img2dataset key: (data offset, size)} of the image members, from the tar headers alone.

    wids' mmap indexer (webdataset's, used for random access by the trainer too) is ~15x faster
    than tarfile here, which parses the PAX header of every member in Python."""
    tar = MMIndexedTar(str(path), verbose=False)
    try:
        index = {}
        for name, header_offset, size in tar.by_index:
            key, _, member_ext = name.rpartition(".")
            if member_ext == ext:
                index[key] = (header_offset + 512, size)  # data follows its 512-byte header
        return index
    finally:
        tar.close()


def image_reason(width: int, height: int, rules: ImageRules) -> str | None:
    if min(width, height) < rules.min_side:
        return "image_too_small"
    limit = rules.max_aspect_ratio  # None: no limit
    if limit is not None and max(width, height) / max(min(width, height), 1) > limit:
        return "image_aspect_ratio"
    return None


def filter_part(part: int, cfg: IngestConfig, work: Path) -> Dict:
    out_dir = work / "filter"
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / f"part-{part:05d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    src = part_dir(work, part)
    done = json.loads((src / "_DONE.json").read_text())
    failed: Counter = Counter()
    filtered: Counter = Counter()
    kept = []
    seen_rows = 0
    for shard in done["shards"]:
        meta = pq.read_table(src / f"{shard}.parquet")
        seen_rows += meta.num_rows
        ok = pc.equal(meta["status"], "success").fill_null(False)
        for message in meta.filter(pc.invert(ok))["error_message"].to_pylist():
            failed[classify_failure(message)] += 1
        good = meta.filter(ok)
        if good.num_rows == 0:
            continue
        if "source_url" in good.column_names:  # the URL img2dataset fetched was the fetch front's
            good = good.set_column(good.column_names.index("url"), "url", good["source_url"])
        index = tar_index(src / f"{shard}.tar", cfg.download.encode_format)
        keep_mask, offsets, sizes = [], [], []
        for key, w, h in zip(good["key"].to_pylist(), good["original_width"].to_pylist(),
                             good["original_height"].to_pylist()):
            reason = "image_missing_in_tar" if key not in index else image_reason(int(w), int(h), cfg.images)
            if reason:
                (failed if reason == "image_missing_in_tar" else filtered)[reason] += 1
            keep_mask.append(reason is None)
            offset, size = index.get(key, (-1, -1))
            offsets.append(offset)
            sizes.append(size)
        columns = KEPT_COLUMNS + list(cfg.input.keep_columns)
        table = good.select(columns).append_column("offset", pa.array(offsets, pa.int64())) \
                    .append_column("size", pa.array(sizes, pa.int64())) \
                    .append_column("tar", pa.array([f"part-{part:05d}/{shard}.tar"] * good.num_rows, pa.string()))
        kept.append(table.filter(pa.array(keep_mask, pa.bool_())))
    lost = done["rows_sent"] - seen_rows  # rows img2dataset never reported: counted, never silent
    if lost:
        failed["lost_in_download"] += lost
    if kept:
        table = pa.concat_tables(kept)
    else:
        table = pa.table({c: pa.array([], pa.string()) for c in ["row_key", "url", "caption", "sha256", "tar"]})
    with atomic_path(out_dir / f"part-{part:05d}.parquet") as tmp:
        pq.write_table(table, tmp)
    counts = {"part": part, "rows_sent": done["rows_sent"], "kept": table.num_rows,
              "failed": dict(failed), "filtered": dict(filtered)}
    atomic_write_text(marker, json.dumps(counts, indent=1))
    return counts
