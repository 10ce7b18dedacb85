"""Ingestion: the whole pipeline against bare img2dataset on the same URL list and loopback
server (same processes x threads, same resize), alternated so that drift hits both, with and
without the fetch front; the throughput of the stages that are ours (input, filter, dedup,
reshard); and the requests/bytes that URL dedup before download saves on a list with 10%
duplicate URLs (counted by the server)."""
from __future__ import annotations

import copy
import functools
import os
import random
import threading
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import run as stages
from pipeline.demo.http_server import LoopbackServer, _QuietHandler
from pipeline.settings import IngestConfig


def _images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def _bare_img2dataset(urls: Path, out: Path, cfg: IngestConfig) -> float:
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset import download

    d = cfg.download
    t0 = time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption", output_folder=str(out),
             output_format="webdataset", image_size=d.image_size, resize_mode=d.resize_mode,
             processes_count=d.processes_count, thread_count=d.thread_count, timeout=d.timeout,
             number_sample_per_shard=d.number_sample_per_shard, enable_wandb=False, extract_exif=False)
    return time.perf_counter() - t0


def _pipeline(urls: Path, out: Path, cfg: IngestConfig) -> dict:
    work = stages.work_dir(cfg, out)
    files = stages.register_parts(urls, work)
    timings = {}
    t0 = time.perf_counter()
    for name, fn in [("input", lambda: stages.run_input(files, cfg, work)),
                     ("url-dedup", lambda: stages.run_url_dedup(len(files), cfg, work)),
                     ("download", lambda: stages.run_download(len(files), cfg, work)),
                     ("filter", lambda: stages.run_filter(len(files), cfg, work)),
                     ("dedup", lambda: stages.run_dedup(len(files), cfg, work)),
                     ("reshard", lambda: stages.run_reshard(cfg, work, out)),
                     ("finalize", lambda: stages.finalize(len(files), cfg, work, out))]:
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return timings


class _CountingHandler(_QuietHandler):
    """Static files, counting requests and body bytes served (what a web host would see)."""

    lock = threading.Lock()
    requests = 0
    bytes = 0

    def copyfile(self, source, outputfile):
        data = source.read()
        with _CountingHandler.lock:
            _CountingHandler.requests += 1
            _CountingHandler.bytes += len(data)
        outputfile.write(data)


def _served(fn) -> tuple:
    """(requests, bytes, seconds) served while fn() runs."""
    _CountingHandler.requests = _CountingHandler.bytes = 0
    t0 = time.perf_counter()
    fn()
    return _CountingHandler.requests, _CountingHandler.bytes, time.perf_counter() - t0


def _duplicate_saving(tmp: Path, n: int, cfg: IngestConfig) -> list:
    """Bare img2dataset (downloads every row, as URL dedup after download did) vs the pipeline
    (URL dedup before download) on n rows of which 10% repeat an earlier URL."""
    rng = random.Random(1)
    unique = int(n * 0.9)
    ids = list(range(unique)) + [rng.randrange(unique) for _ in range(n - unique)]
    rng.shuffle(ids)
    handler = functools.partial(_CountingHandler, directory=str(tmp / "img"))
    with LoopbackServer(handler=handler) as server:
        urls = tmp / "dups.parquet"
        pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in ids],
                                 "caption": [f"a generated picture number {i}" for i in ids]}), urls)
        bare = _served(lambda: _bare_img2dataset(urls, tmp / "dup_bare", cfg))
        ours = _served(lambda: _pipeline(urls, tmp / "dup_full", cfg))
    return [n, unique, bare, ours]


def _dedup_throughput(n_rows: int, partitions: int) -> float:
    """Rows/s of the two dedup passes alone on synthetic metadata with ~10% duplicates."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = random.Random(0)
        (work / "filter").mkdir()
        n_parts = 4
        for part in range(n_parts):
            rows = n_rows // n_parts
            pq.write_table(pa.table({
                "row_key": [f"{part:05d}{i:09d}" for i in range(rows)],
                "url": [f"http://h.test/{rng.randrange(int(n_rows * 0.95))}.jpg" for _ in range(rows)],
                "sha256": [f"{rng.randrange(int(n_rows * 0.95)):064x}" for _ in range(rows)],
                "caption": ["a caption"] * rows, "tar": ["t"] * rows, "offset": [0] * rows, "size": [1] * rows,
            }), work / "filter" / f"part-{part:05d}.parquet")
            # the filter stage's marker: tells the dedup stage the data is big enough for a process pool
            (work / "filter" / f"part-{part:05d}.json").write_text(f'{{"kept": {rows}}}')
        cfg = IngestConfig()
        cfg.dedup.partitions = partitions
        cfg.num_workers = 2
        t0 = time.perf_counter()
        stages.run_dedup(n_parts, cfg, work)
        return n_rows / (time.perf_counter() - t0)


def run(quick: bool = False) -> str:
    n = 500 if quick else 2000
    reps = 1 if quick else 2
    cfg = IngestConfig()
    d = cfg.download
    d.image_size, d.resize_mode, d.processes_count, d.thread_count, d.timeout = 32, "border", 2, 8, 10
    d.number_sample_per_shard = 1000
    cfg.dedup.partitions, cfg.reshard.samples_per_shard, cfg.num_workers = 4, 500, 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        _images(tmp / "img", n)
        bare, full, direct, stage_times = [], [], [], []
        no_front = copy.deepcopy(cfg)
        no_front.download.fetch_front = False
        with LoopbackServer(tmp / "img") as server:
            urls = tmp / "urls.parquet"
            pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(n)],
                                     "caption": [f"a generated picture number {i}" for i in range(n)]}), urls)
            for r in range(reps):  # alternate: bare, pipeline, pipeline without front, ...
                bare.append(n / _bare_img2dataset(urls, tmp / f"bare{r}", cfg))
                timings = _pipeline(urls, tmp / f"full{r}", cfg)
                full.append(n / timings["total"])
                stage_times.append(timings)
                direct.append(n / _pipeline(urls, tmp / f"direct{r}", no_front)["total"])
        dup = _duplicate_saving(tmp, n, cfg)
        dedup_rows = 200_000 if quick else 1_000_000
        dedup_rate = _dedup_throughput(dedup_rows, partitions=8)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _markdown(n, reps, statistics.median(bare), statistics.median(full), statistics.median(direct),
                     min(stage_times, key=lambda t: t["total"]), dup, dedup_rows, dedup_rate)


def _markdown(n: int, reps: int, b: float, f: float, d: float, best: dict, dup: tuple, dedup_rows: int,
              dedup_rate: float) -> str:
    lines = [
        "## Ingestion: `make shards` pipeline vs bare img2dataset",
        "",
        f"{n} rows of 64x48 JPEGs on a loopback server, resized to 32 px; both with 2 processes x 8 threads; "
        f"{reps} alternating repetitions, medians.",
        "",
        "| what | samples/s | ratio to bare img2dataset |",
        "|---|---:|---:|",
        f"| bare img2dataset (download only) | {b:,.0f} | 1.00 |",
        f"| whole pipeline (input, download, filter, dedup, reshard, manifest) | {f:,.0f} | **{f / b:.2f}** |",
        f"| whole pipeline, `download.fetch_front=false` (img2dataset fetches directly) | {d:,.0f} | {d / b:.2f} |",
        "",
        "Stage throughput inside the fastest pipeline run (rows/s of that stage alone):",
        "",
        "| stage | seconds | rows/s |",
        "|---|---:|---:|",
    ]
    for stage in ("input", "url-dedup", "download", "filter", "dedup", "reshard", "finalize"):
        lines.append(f"| {stage} | {best[stage]:.2f} | {n / max(best[stage], 1e-9):,.0f} |")
    lines += ["", f"Dedup alone at scale: {dedup_rows:,} synthetic metadata rows, 8 partitions, 2 workers: "
              f"**{dedup_rate:,.0f} rows/s** (both passes, scatter included).",
              "", "Target: the whole pipeline at >= 0.9x bare img2dataset.", "",
              "The fetch front (Retry-After, 16-bit and EXIF repair; pipeline/stages/fetch.py) costs one more loopback "
              "hop per image; on a loopback server, where fetching is nearly free, that hop is the whole "
              "difference between the two pipeline rows. On the web, fetch latency dominates.", ""]
    n_dup, unique, (b_req, b_bytes, b_s), (o_req, o_bytes, o_s) = dup
    lines += ["### URL dedup before download: a list with 10% duplicate URLs", "",
              f"{n_dup} rows, {unique} distinct URLs; requests and body bytes counted by the server.", "",
              "| what | requests | MB served | seconds |", "|---|---:|---:|---:|",
              f"| bare img2dataset (every row fetched; what URL dedup after download cost) | {b_req} | "
              f"{b_bytes / 1e6:.2f} | {b_s:.1f} |",
              f"| pipeline (URL dedup before download) | {o_req} | {o_bytes / 1e6:.2f} | {o_s:.1f} |",
              f"| saving | **{1 - o_req / b_req:.1%}** | **{1 - o_bytes / b_bytes:.1%}** | |"]
    return "\n".join(lines)
