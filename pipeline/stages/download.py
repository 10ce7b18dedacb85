"""Stage 2, download: one normalised input part, less its duplicate URLs (dedup pass 0) ->
img2dataset (webdataset output) under WORK/download/part-00003/. img2dataset does the fetching,
timeouts, resizing, hashing and its own incremental resume, through our fetch front
(pipeline.stages.fetch: Retry-After and backoff, 16-bit and EXIF-orientation repair); this module runs
them, checks every shard img2dataset claims to have finished, and turns its free-text error
messages into counted failure reasons.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.stages.dedup import duplicate_keys
from pipeline.stages.fetch import FetchFront, FrontSettings
from common.atomic_files import atomic_write_text
from pipeline.settings import IngestConfig

# First match wins. img2dataset reports urllib / OpenCV exceptions as their message text.
FAILURE_REASONS = [
    (re.compile(r"HTTP Error (\d{3})"), r"http_\1"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), "dns_error"),
    (re.compile(r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead", re.I), "connection_error"),
    (re.compile(r"CV_IO_MAX_IMAGE_PIXELS"), "too_many_pixels"),  # decompression bomb, refused before allocation
    (re.compile(r"!buf\.empty\(\)"), "empty_body"),
    (re.compile(r"decod", re.I), "decode_error"),  # not an image (e.g. HTML), or truncated
    (re.compile(r"X-Robots-Tag", re.I), "robots_disallowed"),
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
    (re.compile(r"too small|area too large|aspect ratio", re.I), "image_rejected_by_img2dataset"),
    (re.compile(r"ssl|certificate", re.I), "ssl_error"),
]


_FRONT_FAILURE = re.compile(r"^HTTP Error 599: ", re.S)  # the fetch front's "failed, here is why"


def classify_failure(message: str | None) -> str:
    message = _FRONT_FAILURE.sub("", message or "", count=1)
    for pattern, reason in FAILURE_REASONS:
        match = pattern.search(message)
        if match:
            return match.expand(reason)
    return "other_error"


def part_dir(work: Path, part: int) -> Path:
    return work / "download" / f"part-{part:05d}"


def _shard_complete(folder: Path, shard: str) -> bool:
    """img2dataset writes {shard}.tar/.parquet, then {shard}_stats.json (not atomically): a shard
    counts only when its stats parse and its parquet holds exactly the rows the stats count."""
    try:
        stats = json.loads((folder / f"{shard}_stats.json").read_text())
        return pq.read_metadata(folder / f"{shard}.parquet").num_rows == stats["count"]
    except (OSError, ValueError, KeyError):
        return False


def _remove_incomplete(folder: Path, n_shards: int, oom: int) -> List[str]:
    """Delete the leftovers of shards a kill interrupted so that img2dataset redoes them."""
    removed = []
    for i in range(n_shards):
        shard = f"{i:0{oom}d}"
        if (folder / f"{shard}_stats.json").exists() and not _shard_complete(folder, shard):
            for suffix in ("_stats.json", ".parquet", ".tar"):
                (folder / f"{shard}{suffix}").unlink(missing_ok=True)
            removed.append(shard)
    return removed


def download_part(part: int, cfg: IngestConfig, work: Path) -> Dict:
    """Download one part. Idempotent: a finished part is skipped, an interrupted one resumes."""
    out = part_dir(work, part)
    marker = out / "_DONE.json"
    if marker.exists():
        return json.loads(marker.read_text())
    src = work / "input" / f"part-{part:05d}.parquet"
    if not (work / "input" / f"part-{part:05d}.json").exists():
        raise FileNotFoundError(f"input part {part} is not normalised yet ({src})")
    table = pq.read_table(src)
    dups = duplicate_keys(part, cfg, work)
    if len(dups):
        table = table.filter(pc.invert(pc.is_in(table["row_key"], value_set=dups)))
    rows = table.num_rows
    d = cfg.download
    oom = 5
    n_shards = math.ceil(rows / d.number_sample_per_shard)
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        _remove_incomplete(out, n_shards, oom)
        _run_img2dataset(table, out, cfg)
    missing = [f"{i:0{oom}d}" for i in range(n_shards) if not _shard_complete(out, f"{i:0{oom}d}")]
    if missing:
        raise RuntimeError(f"img2dataset left shards {missing} of part {part} incomplete; rerun to resume")
    shutil.rmtree(out / "_tmp", ignore_errors=True)
    result = {"part": part, "rows_sent": rows, "duplicate_urls_skipped": len(dups), "shards": [f"{i:0{oom}d}" for i in range(n_shards)]}
    atomic_write_text(marker, json.dumps(result, indent=1))
    return result


def front_settings(cfg: IngestConfig) -> FrontSettings:
    d = cfg.download
    return FrontSettings(timeout=d.timeout, retries=d.retries, retry_after_cap=d.retry_after_cap,
                         retry_backoff_s=d.retry_backoff_s, user_agent_token=d.user_agent_token)


def _run_img2dataset(table: pa.Table, out: Path, cfg: IngestConfig) -> None:
    # Both must be in the environment before img2dataset (and cv2 in its workers and in the
    # fetch front's) is imported.
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ["CV_IO_MAX_IMAGE_PIXELS"] = str(cfg.download.max_decode_pixels)
    fetch_list = out / "_fetch.parquet"  # rewritten each run: the front's ports change
    table = table.append_column("source_url", table["url"])
    if not cfg.download.fetch_front:
        pq.write_table(table, fetch_list)
        return _img2dataset(fetch_list, out, cfg, timeout=cfg.download.timeout, retries=cfg.download.retries)
    settings = front_settings(cfg)
    with FetchFront(settings, processes=cfg.download.processes_count) as front:
        urls = pa.array([front.url_for(u) for u in table["url"].to_pylist()], pa.string())
        pq.write_table(table.set_column(table.column_names.index("url"), "url", urls), fetch_list)
        _img2dataset(fetch_list, out, cfg, timeout=math.ceil(settings.client_timeout()), retries=0)


def _img2dataset(fetch_list: Path, out: Path, cfg: IngestConfig, timeout: int, retries: int) -> None:
    from img2dataset import download  # heavy import; only the download stage needs it

    d = cfg.download
    download(
        url_list=str(fetch_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["row_key", "source_url", *cfg.input.keep_columns],
        output_folder=str(out),
        output_format="webdataset",
        incremental_mode="incremental",
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        resize_only_if_bigger=d.resize_only_if_bigger,
        encode_format=d.encode_format,
        encode_quality=d.quality,
        processes_count=d.processes_count,
        thread_count=d.thread_count,
        timeout=timeout,
        retries=retries,
        number_sample_per_shard=d.number_sample_per_shard,
        compute_hash=d.compute_hash,
        user_agent_token=d.user_agent_token,
        disallowed_header_directives=d.disallowed_header_directives,
        distributor=d.distributor,
        enable_wandb=False,
        extract_exif=False,
    )


def failure_counts(metadata_status: List[str | None], messages: List[str | None]) -> Counter:
    """Counted reasons for the rows img2dataset did not deliver."""
    counts: Counter = Counter()
    for status, message in zip(metadata_status, messages):
        if status != "success":
            counts[classify_failure(message)] += 1
    return counts
