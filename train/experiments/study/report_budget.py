"""The report's budget and attribution sections (train/experiments/study/report.py assembles REPORT.md):
has the logit scale (fine-tuning: alignment and uniformity) settled, how much of the features' pull CyCLIP's
regularisers carry over training, and which change moved which verdict since the earlier study.

Every number comes from results.json: ``settling`` (design.settling per arm and seed), ``training_records``
(seed 0's records with lib.Probe's values), ``baseline_cells`` (the earlier budget rerun) and ``previous``
(the earlier study's committed verdicts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib.pyplot as plt

from train.evaluate.report import markdown_table
from train.experiments.claims import ARMS, METRIC

PROBE_KEYS = {"logit_scale": "logit scale", "probe_alignment": "alignment (probe)",
              "probe_uniformity": "uniformity (probe)"}


def seed0(record: Dict, arm: str) -> List[Dict]:
    return record["training_records"][record["runs"][arm][0]]


def chosen_lambda(record: Dict) -> float:
    return record["chosen"]["pretrain"]["cyclip"]["lambda"]


# ---------------------------------------------------------------- plot
def budget_plot(record: Dict, path: Path) -> str:
    """Logit scale, the regularisers' share at the chosen λ, and fine-tuning's alignment/uniformity over steps
    (seed 0 of each arm; the dashed line marks the earlier study's budget)."""
    lam, cfg = chosen_lambda(record), record["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for arm in ("clip", "cyclip"):
        recs = seed0(record, arm)
        axes[0].plot([r["step"] for r in recs], [r["logit_scale"] for r in recs], label=ARMS[arm])
        probed = [r for r in recs if "probe_share_per_lambda" in r]
        axes[1].plot([r["step"] for r in probed], [lam * r["probe_share_per_lambda"] for r in probed],
                     marker=".", label=f"on {ARMS[arm]}'s features")
    for ax in axes[:2]:
        if cfg.get("baseline_pretrain_steps"):
            ax.axvline(cfg["baseline_pretrain_steps"], ls="--", color="gray", label="earlier budget")
        ax.set_xlabel("pretraining step")
        ax.legend(fontsize=8)
    axes[0].set(ylabel="logit scale", title="Logit scale (seed 0)")
    axes[1].set(ylabel=f"‖∇ regularisers‖ / ‖∇ CLIP‖ at λ = {lam:g}", yscale="log",
                title="Regularisers' gradient share (probe)")
    twin = axes[2].twinx()
    for arm, style in (("plain", "-"), ("m2mix", "--")):
        probed = [r for r in seed0(record, arm) if "probe_alignment" in r]
        steps = [r["step"] for r in probed]
        axes[2].plot(steps, [r["probe_alignment"] for r in probed], style, color="C0", label=f"{ARMS[arm]} alignment")
        twin.plot(steps, [r["probe_uniformity"] for r in probed], style, color="C3", label=f"{ARMS[arm]} uniformity")
    axes[2].set(xlabel="fine-tuning step", ylabel="alignment (blue)", title="Fine-tuning probe (seed 0)")
    twin.set_ylabel("uniformity (red)")
    axes[2].legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------- tables
def effect_settling(record: Dict) -> Dict[str, Dict]:
    """design.settling of m²-Mix's effect on the probe (m²-Mix minus plain, seed 0, at the steps both
    probed) under the fine-tuning schedule: whether the *difference* the claims judge had settled."""
    from train.config import OptimConfig
    from train.core.schedule import cosine_lr
    from train.experiments.study.design import settling

    cfg, optim = record["config"], OptimConfig(**record["optim"]["finetune"])
    lrs = [cosine_lr(s, optim) for s in range(optim.steps)]
    plain = {r["step"]: r for r in seed0(record, "plain") if "probe_alignment" in r}
    out = {}
    for key in ("probe_alignment", "probe_uniformity"):
        gap = [{"step": r["step"], key: r[key] - plain[r["step"]][key]}
               for r in seed0(record, "m2mix") if key in r and r["step"] in plain]
        out[key] = settling(gap, key, lrs, cfg["settle_window"], cfg["settle_tolerance"])
    return out


def settling_table(record: Dict) -> str:
    cfg = record["config"]
    rows = []
    for arm, keys in record["settling"].items():
        for key, per_seed in keys.items():
            worst_steps = max(s["steps"]["change"] for s in per_seed)
            worst_lr = max(s["lr"]["change"] for s in per_seed)
            settled = sum(s["settled"] for s in per_seed)
            rows.append([ARMS[arm], PROBE_KEYS[key], f"{sum(s['end'] for s in per_seed) / len(per_seed):.3f}",
                         f"{100 * worst_steps:.1f}% (from step {per_seed[0]['steps']['start']})",
                         f"{100 * worst_lr:.1f}% (from step {per_seed[0]['lr']['start']})",
                         f"{settled} of {len(per_seed)}"])
    for key, s in effect_settling(record).items():
        rows.append(["m²-Mix − plain (seed 0)", PROBE_KEYS[key], f"{s['end']:+.3f}",
                     f"{100 * s['steps']['change']:.1f}% (from step {s['steps']['start']})",
                     f"{100 * s['lr']['change']:.1f}% (from step {s['lr']['start']})", "yes" if s["settled"] else "no"])
    return markdown_table(["arm", "quantity", "at the end (mean)",
                           f"change over the last {cfg['settle_window']:.0%} of steps (worst seed)",
                           f"change over the last {cfg['settle_window']:.0%} of Σ lr (worst seed)",
                           f"seeds settled (Σ lr reading, < {cfg['settle_tolerance']:.0%})"], rows)


def _at(records: List[Dict], step: int, key: str) -> Optional[float]:
    """The value of ``key`` at the last record at or before ``step`` that has it."""
    found = [r[key] for r in records if key in r and r["step"] <= step]
    return found[-1] if found else None


def over_training_table(record: Dict, fractions=(0, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)) -> str:
    """Seed 0: logit scale of each arm and the regularisers' share at the chosen λ on each arm's features."""
    lam, clip, cyclip = chosen_lambda(record), seed0(record, "clip"), seed0(record, "cyclip")
    last = clip[-1]["step"]
    rows = []
    for step in sorted({last if f == 1 else int(round(f * (last + 1))) for f in fractions}):
        cells = [_at(clip, step, "logit_scale"), _at(cyclip, step, "logit_scale"),
                 _at(clip, step, "probe_share_per_lambda"), _at(cyclip, step, "probe_share_per_lambda")]
        cells[2:] = [None if v is None else lam * v for v in cells[2:]]
        rows.append([step] + ["—" if v is None else f"{v:.3g}" for v in cells])
    return markdown_table(["step", "CLIP logit scale", "CyCLIP logit scale", f"share at λ = {lam:g}, CLIP's features",
                           f"share at λ = {lam:g}, CyCLIP's features"], rows)


def _verdict_cell(v: Optional[Dict]) -> str:
    return "—" if v is None else f"{v['verdict']} ({v['gain']:+.4f})"


def what_moved(rerun: Optional[Dict], lam_cell: Optional[Dict], new: Dict) -> str:
    """Which change turned the verdict: the λ grid (earlier budget, earlier λ → earlier budget, new λ), then
    the budget (→ new budget, new λ); the gain's change of each step in parentheses."""
    if rerun is None or lam_cell is None:
        return "not separated (no earlier-budget cells)"
    parts = []
    for label, a, b in (("λ grid", rerun, lam_cell), ("budget", lam_cell, new)):
        if a is b:
            continue
        change = "turned it" if a["verdict"] != b["verdict"] else "kept it"
        parts.append(f"{label} {change} ({b['gain'] - a['gain']:+.4f})")
    return "; ".join(parts)


def then_and_now(record: Dict) -> List[str]:
    """The earlier study's verdicts beside the new ones, with the earlier-budget cells between them."""
    prev = record.get("previous") or {}
    prev_rows = {(v["arm"], v["metric"]): v for v in prev.get("verdicts", [])}
    cells = record.get("baseline_cells", [])
    cfg, lam = record["config"], chosen_lambda(record)
    old_lam = cfg.get("baseline_cyclip_lambda")
    by_lam = {c["lambda"]: {v["metric"]: v for v in c["verdicts"]} for c in cells}
    steps = cells[0]["steps"] if cells else cfg.get("baseline_pretrain_steps")
    rows = []
    for v in record["verdicts"]:
        key = (v["arm"], v["metric"])
        rerun = by_lam.get(old_lam, {}).get(v["metric"]) if v["arm"] == "cyclip" else None
        lam_cell = by_lam.get(lam, {}).get(v["metric"]) if v["arm"] == "cyclip" else None
        moved = what_moved(rerun, lam_cell, v) if v["arm"] == "cyclip" else \
            "fine-tuning budget and the longer-trained CLIP start (not separated)"
        rows.append([f"{ARMS[v['arm']]} vs {ARMS[v['baseline']]}", METRIC[v["metric"]].label,
                     _verdict_cell(prev_rows.get(key)), _verdict_cell(rerun),
                     _verdict_cell(lam_cell) if lam != old_lam else "(same λ)", _verdict_cell(v), moved])
    header = ["comparison", "claimed effect", f"earlier study (committed; {prev.get('design', {}).get('pretrain_steps', '?')} "
              f"steps, λ {prev.get('design', {}).get('cyclip_lambda', '?')})",
              f"{steps} steps, λ {old_lam:g} (rerun)", f"{steps} steps, λ {lam:g}",
              f"{cfg['pretrain_steps']} steps, λ {lam:g} (new)", "what moved it"]
    lines = [markdown_table(header, rows), ""]
    if prev:
        lines.append(f"Earlier study: {prev.get('source', '?')}. Cells: verdict (paired gain, + = better).")
    return lines


def budget_sections(record: Dict, plot_name: str) -> List[str]:
    """The report's "Budget" and "Then and now" sections."""
    cfg, lam = record["config"], chosen_lambda(record)
    pre = record["settling"].get("clip", {}).get("logit_scale", [])
    settled = pre and all(s["settled"] for s in pre)
    literal = pre and all(s["settled_steps"] for s in pre)
    verdict = (f"CLIP's logit scale **settled** by the Σ lr reading at the cap of {cfg['pretrain_steps']} steps."
               if settled else
               f"CLIP's logit scale had **not settled** by the Σ lr reading at the cap of {cfg['pretrain_steps']} "
               f"steps (the run ends at the stated cap)" + (
                   "; the rule read over steps is met, but under the cosine schedule that reading is met by the "
                   "schedule's decay alone (design.py)." if literal else "."))
    return [
        "## Budget: has the logit scale settled?", "",
        f"Rule: a run's quantity has settled when it changes by less than {cfg['settle_tolerance']:.0%} over the last "
        f"{cfg['settle_window']:.0%} of the run, read over steps and over the summed learning rate (train/experiments/"
        "study/design.py says why both). Pretraining watches the logit scale; fine-tuning, whose CLIP scale is "
        f"fixed, watches the probe's alignment and uniformity ({cfg['probe_size']} val pairs, every "
        f"{cfg['probe_every']} steps).", "",
        verdict, "", settling_table(record), "",
        f"Over training (seed 0): the logit scale and the regularisers' gradient share at the chosen λ = {lam:g} "
        "(stated at the reference batch), measured on each arm's own probe features "
        "(‖∇ λ·(C_in + C_cross)‖ / ‖∇ CLIP‖; a share of 1 means the regularisers pull as hard as CLIP):", "",
        over_training_table(record), "", f"![budget](plots/{plot_name})", "",
        "## Then and now: which change moved which verdict", "", *then_and_now(record), "",
    ]
