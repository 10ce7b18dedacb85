"""`python -m train.evaluate compare RUN_DIR... --out DIR`: several evaluated runs side by side.

Runs whose config.yaml differ only in seed keys (and bookkeeping such as the run folder) form one
group, reported as mean ± sample standard deviation over its seeds. The first group given is the
baseline of effective robustness (e.g. CLIP when comparing CLIP with CyCLIP).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from common.atomic_files import atomic_write_text

from . import metrics
from .config import EvalInputError
from .core import headline
from .report import markdown_table, metric_bars

# Keys that never change what a run learns: where it writes, how it logs, how it was launched.
BOOKKEEPING_KEYS = ("run.run_dir", "run.resume", "run.device", "run.stop_after_steps", "data.num_workers")
BOOKKEEPING_PREFIXES = ("logging.", "checkpoint.")


def find_eval_json(run: Path) -> Path:
    """RUN/eval/eval.json (or RUN/eval.json); EvalInputError naming the run and the command that writes it."""
    if not run.is_dir():
        what = "is not a folder" if run.exists() else "does not exist"
        raise EvalInputError(f"run {run} {what} (compare takes RUN_DIRs that hold eval/eval.json)")
    for candidate in (run / "eval" / "eval.json", run / "eval.json"):
        if candidate.is_file():
            return candidate
    raise EvalInputError(f"run {run} has no evaluation (eval/eval.json): run `python -m train.evaluate "
                         f"--checkpoint {run}` first")


def read_eval_json(run: Path) -> Dict:
    """The parsed eval.json of ``run``; EvalInputError if it is missing, not JSON or not a result object."""
    path = find_eval_json(run)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EvalInputError(f"{path}: not readable as JSON ({' '.join(str(err).split())}); rerun "
                             f"`python -m train.evaluate --checkpoint {run}`") from None
    sections = ("zero_shot", "retrieval", "embedding", "robustness")    # what core.headline reads
    if not isinstance(result, dict) or not any(isinstance(result.get(k), dict) for k in sections) \
            or any(k in result and not isinstance(result[k], dict) for k in sections):
        raise EvalInputError(f"{path}: not an eval.json written by `python -m train.evaluate` "
                             f"(expected an object with {', '.join(sections)} blocks)")
    return result


def flat_config(run: Path) -> Dict[str, str]:
    """config.yaml as {dotted.key: value-as-text}, without seed and bookkeeping keys ({} if absent)."""
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    flat: Dict[str, str] = {}

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True)

    walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), "")
    return {k: v for k, v in flat.items()
            if "seed" not in k.rsplit(".", 1)[-1] and k not in BOOKKEEPING_KEYS
            and not k.startswith(BOOKKEEPING_PREFIXES)}


def group_runs(runs: Sequence[Path]) -> List[List[Path]]:
    """Runs with equal seed-free configs, in order of first appearance. Runs without config.yaml stay alone."""
    groups: Dict[str, List[Path]] = {}
    for run in runs:
        cfg = flat_config(run)
        key = json.dumps(cfg, sort_keys=True) if cfg else f"__alone__{run}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def group_label(group: Sequence[Path]) -> str:
    names = [p.resolve().name for p in group]
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names).rstrip("_-.s")
    return prefix or names[0]


def config_differences(groups: Sequence[Sequence[Path]]) -> List[str]:
    """For each group, the config values that differ between groups (what the comparison is about)."""
    cfgs = [flat_config(g[0]) for g in groups]
    keys = sorted({k for c in cfgs for k in c if len({c.get(k) for c in cfgs}) > 1})
    return [", ".join(f"{k}={c.get(k, '—')}" for k in keys) or "—" for c in cfgs]


def mean_spread(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), count)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def compare(runs: Sequence[str | Path], out_dir: str | Path) -> Dict:
    """Write compare.json, compare.md and metric_bars.png for ``runs``; returns the table."""
    runs = [Path(r) for r in runs]
    out_dir = Path(out_dir)
    results = {r: read_eval_json(r) for r in runs}    # every input checked before anything is written
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalInputError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    labels = [group_label(g) for g in groups]
    if len(set(labels)) < len(labels):  # two groups share a name prefix: number them
        labels = [f"{i + 1}:{lab}" for i, lab in enumerate(labels)]

    baseline = [results[r]["robustness"] for r in groups[0] if "robustness" in results[r]]
    per_run: Dict[Path, Dict[str, float]] = {}
    for run in runs:
        flat = headline(results[run])
        rob = results[run].get("robustness")
        if rob and baseline:
            flat["robustness.effective"] = metrics.effective_robustness(
                rob["clean_top1"], rob["shifted_top1"],
                [b["clean_top1"] for b in baseline], [b["shifted_top1"] for b in baseline])
        per_run[run] = flat

    table: Dict[str, Dict[str, Tuple[float, float, int]]] = {}
    for label, group in zip(labels, groups):
        names = sorted({m for r in group for m in per_run[r]})
        table[label] = {m: mean_spread([per_run[r][m] for r in group if m in per_run[r]]) for m in names}

    metric_names = sorted({m for row in table.values() for m in row})
    cell = lambda t: "—" if t is None else (f"{t[0]:.4f}" if t[2] == 1 else f"{t[0]:.4f} ± {t[1]:.4f} (n={t[2]})")
    rows = [[m] + [cell(table[lab].get(m)) for lab in labels] for m in metric_names]
    diffs = config_differences(groups)
    md = ["# Run comparison", "",
          "Cells are mean ± sample standard deviation over runs that differ only in their seed (n = runs). "
          f"Effective robustness: mean shifted top-1 above the logit-linear trend of the baseline group "
          f"`{labels[0]}` (its own value is ~0 by construction).", "",
          markdown_table(["metric"] + labels, rows), "", "## Groups", "",
          markdown_table(["group", "runs", "config difference"],
                         [[lab, ", ".join(str(r) for r in g), d] for lab, g, d in zip(labels, groups, diffs)]), ""]
    atomic_write_text(out_dir / "compare.md", "\n".join(md))
    payload = {"groups": [{"label": lab, "runs": [str(r) for r in g], "config_difference": d,
                           "metrics": {m: {"mean": t[0], "spread": t[1], "n": t[2]} for m, t in table[lab].items()}}
                          for lab, g, d in zip(labels, groups, diffs)],
               "per_run": {str(r): v for r, v in per_run.items()}}
    atomic_write_text(out_dir / "compare.json", json.dumps(payload, indent=1))
    metric_bars(table, out_dir / "metric_bars.png")
    return payload

