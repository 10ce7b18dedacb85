"""The stages in order, each a loop of independent, idempotent units over the work folder.

A rerun after a crash (kill -9 at any moment) skips the units whose marker exists and redoes the
rest; since every unit is deterministic, the final shards equal those of an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, List

from tqdm import tqdm

from pipeline.stages.dedup import reduce_content, reduce_input_urls, reduce_url, scatter_input_urls, scatter_part
from pipeline.stages.download import download_part
from pipeline.stages.filter import filter_part
from common.atomic_files import atomic_write_text
from pipeline.stages.read_input import InputError, list_input_files, normalize_part
from pipeline.stages.reshard import plan, reshard_partition
from pipeline.settings import IngestConfig
from pipeline.stages.summary import check_not_empty, finalize, format_summary

log = logging.getLogger("pipeline")


def work_dir(cfg: IngestConfig, out: Path) -> Path:
    return Path(cfg.work_dir) if cfg.work_dir else Path(out) / "_work"


def register_parts(urls: str | Path, work: Path) -> List[Path]:
    """Fix the part numbering on the first run; a rerun must see the same input files."""
    files = [p.resolve() for p in list_input_files(urls)]
    record = work / "parts.json"
    if record.exists():
        known = [Path(p) for p in json.loads(record.read_text())]
        if known != files:
            raise InputError(f"{record}: the input files changed since this work folder was started "
                               f"({len(known)} then, {len(files)} now); use a new OUT or delete {work}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps([str(p) for p in files], indent=1))
    return files


def registered_parts(work: Path) -> List[Path]:
    record = work / "parts.json"
    if not record.exists():
        raise InputError(f"{record} not found: run `python -m pipeline parts` (or `run`) first")
    return [Path(p) for p in json.loads(record.read_text())]


def _each(name: str, fn: Callable, items: Iterable, workers: int) -> list:
    """Run fn over items (in a process pool when workers > 1) with a progress bar."""
    items = list(items)
    t0 = time.perf_counter()
    results = []
    # delay: a stage that ends (or stops on bad input) within a second draws no bar, so a one-line
    # input error stays one line; the log line below still reports the stage.
    with tqdm(total=len(items), desc=f"{name:>9}", unit="task", leave=True, delay=1.0) as bar:
        if workers > 1 and len(items) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
                for result in pool.map(fn, items):
                    results.append(result)
                    bar.update()
        else:
            for item in items:
                results.append(fn(item))
                bar.update()
    log.info("%s: %d tasks in %.1f s", name, len(items), time.perf_counter() - t0)
    return results


class _Unit:
    """A picklable (stage function, config, work) closure for the process pool."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, item):
        return self.fn(item, *self.args)


def _normalize(i: int, files: List[Path], cfg: IngestConfig, work: Path) -> Dict:
    return normalize_part(files[i], i, cfg, work)


def run_input(files: List[Path], cfg: IngestConfig, work: Path) -> list:
    return _each("input", _Unit(_normalize, files, cfg, work), range(len(files)), cfg.num_workers)


def run_url_dedup(n_parts: int, cfg: IngestConfig, work: Path) -> None:
    """Exact URL duplicates are found before download, so they cost no request (dedup pass 0)."""
    workers = _workers_for(cfg, work, "input", "accepted")
    _each("scatter-url", _Unit(scatter_input_urls, cfg, work), range(n_parts), workers)
    _each("dedup-url", _Unit(reduce_input_urls, n_parts, cfg, work), range(cfg.dedup.partitions), workers)


def prepare_parts(urls: str | Path, cfg: IngestConfig, work: Path) -> List[Path]:
    """Register, normalise and URL-deduplicate every input part: what must be global before any
    download starts (the `parts` command, i.e. the SLURM submit job)."""
    files = register_parts(urls, work)
    run_input(files, cfg, work)
    run_url_dedup(len(files), cfg, work)
    return files


def run_download(n_parts: int, cfg: IngestConfig, work: Path) -> list:
    # Sequential over parts: img2dataset already runs processes_count x thread_count downloads.
    return [download_part(i, cfg, work) for i in range(n_parts)]


# Below this many rows a stage runs in-process: forking a pool costs more than it saves.
POOL_MIN_ROWS = 50_000


def _workers_for(cfg: IngestConfig, work: Path, stage_dir: str, key: str) -> int:
    """cfg.num_workers, or 1 when the previous stage's markers say the data is small."""
    rows = sum(json.loads(m.read_text()).get(key, 0) for m in (work / stage_dir).glob("part-*.json"))
    return cfg.num_workers if rows >= POOL_MIN_ROWS else 1


def run_filter(n_parts: int, cfg: IngestConfig, work: Path) -> list:
    workers = _workers_for(cfg, work, "input", "accepted")
    return _each("filter", _Unit(filter_part, cfg, work), range(n_parts), workers)


def _require(work: Path, stage_dir: str, n: int, pattern: str, command: str, note: str = "") -> None:
    """Refuse to start a stage before the one it reads from has written all its markers."""
    missing = [i for i in range(n) if not (work / stage_dir / pattern.format(i)).exists()]
    if missing:
        raise InputError(f"{work}: {len(missing)} of {n} '{stage_dir}' units not finished (first: "
                         f"{pattern.format(missing[0])}): run `python -m pipeline {command}`{note} on this folder first")


def _check_partition(q: int | None, cfg: IngestConfig) -> None:
    if q is not None and not 0 <= q < cfg.dedup.partitions:
        raise InputError(f"--partition {q} is out of range: dedup.partitions is {cfg.dedup.partitions}, "
                         f"so 0..{cfg.dedup.partitions - 1}")


def dedup_partition(q: int, dedup_pass: str, n_parts: int, cfg: IngestConfig, work: Path) -> Dict:
    """One partition of one dedup pass (a SLURM array task): every url partition needs all parts'
    scatters (done by `part`), every content partition needs all url partitions."""
    _check_partition(q, cfg)
    if dedup_pass == "url":
        _require(work, "dedup/by_url", n_parts, "_scattered-{:05d}.json", "part --index I", " for every part")
        return reduce_url(q, n_parts, cfg, work)
    _require(work, "dedup/by_url", cfg.dedup.partitions, "_reduced-p{:04d}.json",
             "dedup --pass url --partition P",
             " for every partition")
    return reduce_content(q, cfg, work)


def run_dedup(n_parts: int, cfg: IngestConfig, work: Path) -> None:
    P = cfg.dedup.partitions
    _require(work, "filter", n_parts, "part-{:05d}.json", "part --index I", " for every part (or `run`)")
    workers = _workers_for(cfg, work, "filter", "kept")
    _each("scatter", _Unit(scatter_part, cfg, work), range(n_parts), workers)
    _each("dedup-url2", _Unit(reduce_url, n_parts, cfg, work), range(P), workers)
    _each("dedup-img", _Unit(reduce_content, cfg, work), range(P), workers)


def run_reshard(cfg: IngestConfig, work: Path, out: Path, only: int | None = None) -> None:
    _check_partition(only, cfg)
    P = cfg.dedup.partitions
    missing = [q for q in range(P) if not (work / "dedup" / "final" / f"q{q:04d}.json").exists()]
    if missing:
        raise InputError(f"{work}: {len(missing)} of {P} dedup partitions not finished (first: {missing[0]}): "
                         "run `python -m pipeline dedup` (or `global`) on this folder first")
    shard_plan = plan(cfg, work)
    partitions = range(cfg.dedup.partitions) if only is None else [only]
    workers = _workers_for(cfg, work, "filter", "kept")
    _each("reshard", _Unit(reshard_partition, cfg, work, out, shard_plan), partitions, workers)


def run_part(i: int, files: List[Path], cfg: IngestConfig, work: Path) -> None:
    """Everything that needs only part i: one SLURM array task (after `parts`)."""
    if not 0 <= i < len(files):
        raise InputError(f"--index {i} is out of range: {work} has {len(files)} part(s), 0..{len(files) - 1}")
    normalize_part(files[i], i, cfg, work)
    download_part(i, cfg, work)
    filter_part(i, cfg, work)
    scatter_part(i, cfg, work)


def run_finalize(n_parts: int, cfg: IngestConfig, work: Path, out: Path) -> Dict:
    _require(work, "filter", n_parts, "part-{:05d}.json", "part --index I", " for every part (or `run`)")
    _require(work, "reshard", cfg.dedup.partitions, "q{:04d}.json", "reshard", " (or `global`)")
    summary = finalize(n_parts, cfg, work, out)
    print(format_summary(summary))
    warning = check_not_empty(summary, out, cfg.reshard.train_split)  # raises when nothing was written
    if warning:
        print(warning, file=sys.stderr)
    return summary


def run_all(urls: str | Path, out: str | Path, cfg: IngestConfig) -> Dict:
    """URL list(s) -> finished dataset folder. Returns summary.json's content."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    out = Path(out)
    work = work_dir(cfg, out)
    t0 = time.perf_counter()
    files = prepare_parts(urls, cfg, work)
    run_download(len(files), cfg, work)
    run_filter(len(files), cfg, work)
    run_dedup(len(files), cfg, work)
    run_reshard(cfg, work, out)
    summary = run_finalize(len(files), cfg, work, out)
    elapsed = time.perf_counter() - t0
    print(f"{summary['written']:,} samples in {sum(summary['shards'].values())} shards -> {out} "
          f"({elapsed:.1f} s, {summary['input_rows'] / max(elapsed, 1e-9):.0f} input rows/s)")
    return summary
