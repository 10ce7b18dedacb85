"""Finalize: add up every stage's counts into OUT/summary.json, check that no row vanished,
then write the manifest (last: its presence marks the dataset complete)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict

from common.shard_folder import Manifest, ShardInfo, SplitInfo, write_manifest

from common.atomic_files import atomic_write_text
from pipeline.settings import IngestConfig
from common.errors import UserError


class EmptyDatasetError(UserError):
    """The run finished and accounted for every row, but wrote no sample: a user-level failure (dead
    URLs, rules that reject everything), reported as one line; summary.json and the manifest stay."""


class AccountingError(RuntimeError):
    """input_rows != written + failed + filtered + duplicates: a bug, never silently accepted."""


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def build_summary(n_parts: int, cfg: IngestConfig, work: Path) -> Dict:
    input_rows = 0
    filtered: Counter = Counter()
    failed: Counter = Counter()
    repaired: Counter = Counter()
    for part in range(n_parts):
        counts = _load(work / "input" / f"part-{part:05d}.json")
        input_rows += counts["input_rows"]
        filtered.update(counts["filtered"])
        repaired.update(counts["repaired"])
        counts = _load(work / "filter" / f"part-{part:05d}.json")
        failed.update(counts["failed"])
        filtered.update(counts["filtered"])
    P = cfg.dedup.partitions
    dup_url = sum(_load(work / "dedup" / "pre_url" / f"_reduced-p{p:04d}.json")["duplicate_url"] +  # before download
                  _load(work / "dedup" / "by_url" / f"_reduced-p{p:04d}.json")["duplicate_url"] for p in range(P))
    dup_content = sum(_load(work / "dedup" / "final" / f"q{q:04d}.json")["duplicate_content"] for q in range(P))
    written: Counter = Counter()
    shards: Dict[str, list] = {}
    for q in range(P):
        for split, items in _load(work / "reshard" / f"q{q:04d}.json").items():
            shards.setdefault(split, []).extend(items)
            written[split] += sum(s["num_samples"] for s in items)
    summary = {
        "input_rows": input_rows,
        "written": sum(written.values()),
        "written_by_split": dict(written),
        "failed": dict(sorted(failed.items())),
        "filtered": dict(sorted(filtered.items())),
        "duplicates": dup_url + dup_content,
        "duplicates_by": {"url": dup_url, "content": dup_content},
        "repaired": dict(repaired),
        "shards": {split: len(items) for split, items in shards.items()},
    }
    accounted = summary["written"] + sum(failed.values()) + sum(filtered.values()) + summary["duplicates"]
    if accounted != input_rows:
        raise AccountingError(f"{input_rows} input rows but {accounted} accounted for: {summary}")
    summary["_shard_list"] = shards
    return summary


def finalize(n_parts: int, cfg: IngestConfig, work: Path, out: Path) -> Dict:
    summary = build_summary(n_parts, cfg, work)
    shards = summary.pop("_shard_list")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    splits = {split: SplitInfo(shards=[ShardInfo(**s) for s in sorted(items, key=lambda s: s["path"])])
              for split, items in sorted(shards.items())}
    write_manifest(out, Manifest(splits=splits, seed=cfg.reshard.seed))
    return summary


def format_summary(summary: Dict) -> str:
    """The final table printed at the end of a run (wider when a label is long: column:<rule> reasons)."""
    rows = [("input rows", summary["input_rows"])]
    rows += [("written: " + split, n) for split, n in summary["written_by_split"].items()]
    rows += [(group + ": " + reason, n) for group in ("failed", "filtered") for reason, n in summary[group].items()]
    rows += [("duplicates: " + kind, n) for kind, n in summary["duplicates_by"].items()]
    rows += [("(kept, repaired: " + reason + ")", n) for reason, n in summary.get("repaired", {}).items()]
    width = max([34] + [len(label) + 2 for label, _ in rows])
    lines = [f"{label:<{width}}{n:>12,}" for label, n in rows]
    rule = "-" * (width + 12)
    return "\n".join([rule, *lines, rule])


def top_reason(summary: Dict) -> tuple[str, int] | None:
    """The most frequent reason a row was not written: ("failed: http_404", count), or None."""
    reasons = {f"{group}: {r}": n for group in ("failed", "filtered") for r, n in summary[group].items()}
    reasons.update({f"duplicates: {k}": n for k, n in summary["duplicates_by"].items()})
    reasons = {k: n for k, n in reasons.items() if n}
    return max(reasons.items(), key=lambda kv: kv[1]) if reasons else None


def check_not_empty(summary: Dict, out: Path, train_split: str) -> str | None:
    """EmptyDatasetError when no sample was written; a warning line (returned) when only the main
    split is empty; None when all is well."""
    top = top_reason(summary)
    why = f"top reason {top[0]} ({top[1]:,} of {summary['input_rows']:,} rows)" if top else "no input rows"
    if summary["written"] == 0:
        raise EmptyDatasetError(f"{out}: 0 samples written, the dataset is unusable; {why}; "
                                f"counts in {out / 'summary.json'}")
    if not summary["written_by_split"].get(train_split):
        return f"warning: split '{train_split}' is empty ({why}); counts in {out / 'summary.json'}"
    return None
