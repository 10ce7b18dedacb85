"""`python -m pipeline index`: a dataset folder (manifest.json) for WebDataset shards you already have.

    python -m pipeline index --shards SPEC [--shards SPEC ...] --out DIR [--split NAME] [--subset FILE]
                             [workers=N] [storage_options={...}] [split=NAME]

The shards stay where they are (local, ``file://``, ``http(s)://``, ``s3://``, ``gs://``, ``pipe:``); the manifest
names each by its own location (``common.shard_folder.locate``). A SPEC is a folder (its ``*.tar``, sorted), a
glob (sorted; remote ones through fsspec) or a brace pattern (``s3://bucket/laion/{00000..41455}.tar``, in
brace order; the only form for ``pipe:``). Shard order = the SPECs' order, each expanded as said.

Per shard (pipeline/index_shard.py): the count from ``{shard}_stats.json``, else ``sizes.json``, else a scan
(its sample index goes to DIR/index/SPLIT/NNNNNN.idx); with ``--subset`` every shard is scanned and its index
keeps only the listed samples. Unusable shards are skipped, one line each, and counted in
DIR/index_summary.json. Resumable: each shard's result is appended to DIR/.index_progress-SPLIT.jsonl under a
fingerprint of the arguments (shard list, split, subset file); the same command continues after a kill and
writes a byte-identical manifest; other arguments on the same DIR and split start that split over.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from tqdm import tqdm

from common.atomic_files import atomic_write_text
from common.config_loader import load_config
from common.errors import ConfigError, InputError
from common.shard_folder import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from pipeline.index_shard import Job, SizesCache, index_shard, is_pipe, is_remote, load_subset

SUMMARY_NAME = "index_summary.json"


@dataclass
class IndexConfig:
    """The ``key=value`` options of ``python -m pipeline index``."""

    workers: int = 16
    """Shards indexed at once (threads: the work is reading)."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote SPECs, e.g. {key: K, secret: S, client_kwargs: {endpoint_url: http://host:8333}};
    the trainer needs the same as data.storage_options. Not part of the fingerprint (credentials may rotate)."""
    split: str = "train"
    """Manifest split to write (same as --split)."""

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be >= 1")
        if not self.split or "/" in self.split or self.split.startswith("."):
            raise ConfigError(f"split={self.split!r}: a plain name such as train or val")


# ---------------------------------------------------------------- SPEC -> shard locations
def expand_spec(spec: str, storage_options: Optional[dict] = None) -> List[str]:
    """The shard locations a SPEC names, in order; InputError when a folder or glob matches nothing."""
    from braceexpand import braceexpand

    if is_pipe(spec):
        return list(braceexpand(spec))  # a command cannot be listed: brace patterns or one shard
    out: List[str] = []
    for one in braceexpand(spec):
        if any(c in one for c in "*?["):
            out += _glob(one, storage_options)
        elif is_remote(one):
            last = one.rstrip("/").rsplit("/", 1)[-1]
            out += _shards_in(_glob(one.rstrip("/") + "/*", storage_options)) if one.endswith("/") or "." not in last \
                else [one]
        else:
            path = os.path.abspath(one.removeprefix("file://"))
            out += _shards_in(glob.glob(os.path.join(glob.escape(path), "*"))) if os.path.isdir(path) else [path]
    if not out:
        raise InputError(f"--shards {spec}: no shards matched (a folder is read for its "
                         f"{', '.join('*' + s for s in SHARD_SUFFIXES)} files)")
    return out


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
"""What a folder SPEC lists: tars and compressed tars (webdataset's tarfile reads gzip, bzip2 and xz; zstd is
listed so that it is refused in one line rather than silently passed over)."""


def _shards_in(paths: List[str]) -> List[str]:
    return sorted(p for p in paths if p.endswith(SHARD_SUFFIXES))


def _glob(pattern: str, storage_options: Optional[dict]) -> List[str]:
    if not is_remote(pattern):
        return sorted(os.path.abspath(p) for p in glob.glob(pattern.removeprefix("file://")) if os.path.isfile(p))
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(pattern, **(storage_options or {}))
        found = fs.glob(path)
    except Exception as err:  # noqa: BLE001 - the backend's error for an unreachable host or a missing bucket
        raise InputError(f"--shards {pattern}: cannot list it ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from None
    return sorted(p if "://" in p else fs.unstrip_protocol(p) for p in found)


# ---------------------------------------------------------------- resumable progress
def fingerprint(locations: List[str], split: str, subset: Optional[str]) -> str:
    """What the records of a progress file depend on: the shard list, the split and the subset file's identity."""
    ident = ""
    if subset:
        st = os.stat(subset)
        ident = f"{os.path.realpath(subset)}:{st.st_size}:{st.st_mtime_ns}"
    text = json.dumps({"split": split, "subset": ident, "shards": locations})
    return hashlib.sha256(text.encode()).hexdigest()


def resume(out: Path, split: str, fp: str) -> Dict[int, dict]:
    """The records of an earlier run with the same fingerprint; otherwise this split starts over (its progress,
    sample indexes and manifest entry removed) and {} is returned."""
    path = out / f".index_progress-{split}.jsonl"
    if path.is_file():
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # a line cut by a kill is dropped (and redone)
        lines = data.decode().splitlines()
        if lines and json.loads(lines[0]).get("fingerprint") == fp:
            path.write_bytes(data)
            records = {}
            for line in lines[1:]:
                record = json.loads(line)
                records[record["i"]] = record
            return records
    _forget_split(out, split)
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"fingerprint": fp}) + "\n")
    return {}


def _forget_split(out: Path, split: str) -> None:
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(out)
        except (OSError, ValueError):
            manifest = None
        if manifest is None or set(manifest.splits) <= {split}:
            (out / MANIFEST_NAME).unlink()
        elif split in manifest.splits:
            del manifest.splits[split]
            write_manifest(out, manifest)
    shutil.rmtree(out / "index" / split, ignore_errors=True)


def bounded_map(pool: ThreadPoolExecutor, fn, items: List, in_flight: int) -> Iterator:
    """fn(item) for each item, at most ``in_flight`` submitted at once, results as they complete."""
    pending, it = set(), iter(items)
    while True:
        while len(pending) < in_flight:
            item = next(it, None)
            if item is None:
                break
            pending.add(pool.submit(fn, item))
        if not pending:
            return
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            yield future.result()


# ---------------------------------------------------------------- the command
def run_index(specs: List[str], out: Path, cfg: IndexConfig, subset_path: Optional[str] = None) -> dict:
    """Index the shards of ``specs`` into ``out``; returns the summary (also written to DIR/index_summary.json)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; it must be a folder")
    subset = load_subset(subset_path) if subset_path else None  # a bad file is refused before any listing
    so = dict(cfg.storage_options or {})
    locations = [loc for spec in specs for loc in expand_spec(spec, so)]
    records = resume(out, cfg.split, fingerprint(locations, cfg.split, subset_path))
    job = Job(so, out, f"index/{cfg.split}/{{}}.idx", subset, SizesCache(so))
    (out / "index" / cfg.split).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".tmp", ignore_errors=True)
    (out / ".tmp").mkdir()
    todo = [i for i in range(len(locations)) if i not in records]
    held: List[str] = []  # skip lines wait until a shard is usable: if none is, the error is one line
    usable = any("skipped" not in r for r in records.values())
    with open(out / f".index_progress-{cfg.split}.jsonl", "a") as progress, \
            ThreadPoolExecutor(cfg.workers) as pool, \
            tqdm(total=len(locations), initial=len(records), desc="index", unit="shard", file=sys.stderr,
                 delay=1.0) as bar:
        for record in bounded_map(pool, lambda i: index_shard(i, locations[i], job), todo, 4 * cfg.workers):
            progress.write(json.dumps(record, sort_keys=True) + "\n")
            progress.flush()
            records[record["i"]] = record
            bar.update()
            if "skipped" in record:
                held.append(f"skipped shard {record['path']}: {record['skipped']}")
            else:
                usable = True
            if usable:
                for line in held:
                    bar.write(line, file=sys.stderr)
                held = []
    shutil.rmtree(out / ".tmp", ignore_errors=True)
    ordered = [records[i] for i in range(len(locations))]
    summary = summarize(ordered, subset)
    _write_summary(out, cfg.split, summary)
    if not usable:
        first = ordered[0]
        raise InputError(f"no usable shard among the {len(ordered)} matched by --shards {' '.join(specs)} "
                         f"(first: {first['path']}: {first['skipped']}; all in {out / SUMMARY_NAME})")
    if subset is not None and not summary["samples"]:
        raise InputError(f"--subset {subset_path}: none of its {subset.listed} listed ids is in the "
                         f"{summary['indexed']} usable shards (keys are member basenames, uids 32 hex digits)")
    shards = [ShardInfo(r["path"], r["num_samples"], sha256=r["sha256"], image_ext=r["image_ext"], index=r["index"])
              for r in ordered if "skipped" not in r]
    manifest = read_manifest(out) if (out / MANIFEST_NAME).is_file() else Manifest()
    manifest.splits[cfg.split] = SplitInfo(shards=shards)
    manifest.splits = dict(sorted(manifest.splits.items()))
    write_manifest(out, manifest)
    return summary


def summarize(records: List[dict], subset) -> dict:
    ok = [r for r in records if "skipped" not in r]
    skipped = [r for r in records if "skipped" in r]
    summary = {"shards_found": len(records), "indexed": len(ok), "skipped": len(skipped),
               "skipped_by_reason": dict(sorted(Counter(r["skipped"].split(" (")[0] for r in skipped).items())),
               "skipped_shards": [{"path": r["path"], "reason": r["skipped"]} for r in skipped],
               "samples": sum(r["num_samples"] for r in ok),
               "counted_by": dict(sorted(Counter(r["source"] for r in ok).items()))}
    if subset is not None:
        summary["subset"] = {"listed_ids": subset.listed, "found": sum(r.get("kept_ids", 0) for r in ok)}
    return summary


def _write_summary(out: Path, split: str, summary: dict) -> None:
    path = out / SUMMARY_NAME
    try:
        everything = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        everything = {}
    everything[split] = summary
    atomic_write_text(path, json.dumps(dict(sorted(everything.items())), indent=1))


def main(args) -> None:
    """The ``index`` subcommand of ``python -m pipeline`` (argparse ``args``: shards, out, split, subset, overrides)."""
    cfg = load_config(IndexConfig, None, args.overrides)
    if args.split is not None:
        if any(o.startswith("split=") for o in args.overrides) and args.split != cfg.split:
            raise ConfigError(f"--split {args.split} and split={cfg.split} disagree; give one")
        cfg.split = args.split
        cfg.validate()
    summary = run_index(args.shards, Path(args.out), cfg, args.subset)
    line = (f"indexed {summary['indexed']} of {summary['shards_found']} shards, {summary['samples']} samples "
            f"({', '.join(f'{n} by {k}' for k, n in summary['counted_by'].items())}); skipped {summary['skipped']}")
    if "subset" in summary:
        line += f"; subset: {summary['subset']['found']} of {summary['subset']['listed_ids']} listed ids found"
    print(f"{line}; {Path(args.out) / MANIFEST_NAME}")
