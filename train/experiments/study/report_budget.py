"""The report's budget and attribution sections (train/experiments/study/report.py assembles REPORT.md):
has the logit scale (fine-tuning: alignment and uniformity) settled, how much of the features' pull CyCLIP's
regularisers carry over training, and which change moved which verdict since the earlier study.

Every number comes from results.json: ``settling`` (design.settling per arm and seed), ``training_records``
(seed 0's records with lib.Probe's values), ``baseline_cells`` (the earlier budget rerun) and ``previous``
(the earlier study's committed verdicts).
"""
from __future__ import annotations

from pathlib import Path
from statistics import fmean
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
    """design.settling of m²-Mix's effect on the probe under the fine-tuning schedule (seed 0, at the steps
    both arms probed): the gain plain − m²-Mix (alignment and uniformity are better lower, so + = better, as
    the verdicts sign it). Whether the *difference* the claims judge had settled; a gain near 0 cannot settle
    relatively (its change is read against its own size)."""
    from train.config import OptimConfig
    from train.experiments.study.design import schedule_lrs, settling

    cfg, lrs = record["config"], schedule_lrs(OptimConfig(**record["optim"]["finetune"]))
    plain = {r["step"]: r for r in seed0(record, "plain") if "probe_alignment" in r}
    out = {}
    for key in ("probe_alignment", "probe_uniformity"):
        gain = [{"step": r["step"], key: plain[r["step"]][key] - r[key]}
                for r in seed0(record, "m2mix") if key in r and r["step"] in plain]
        out[key] = settling(gain, key, lrs, cfg["settle_window"], cfg["settle_tolerance"])
    return out


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def _change(reading: Dict) -> str:
    change = "—" if reading["change"] == float("inf") else f"{100 * reading['change']:.2f}%"
    return f"{change} (vs step {reading.get('from', reading['start'])})"


def settling_table(record: Dict) -> str:
    cfg = record["config"]
    rows = []
    for arm, keys in record["settling"].items():
        for key, per_seed in keys.items():
            worst = {by: max(per_seed, key=lambda s: s[by]["change"])[by] for by in ("steps", "lr")}
            settled = sum(s["settled"] for s in per_seed)
            rows.append([ARMS[arm], PROBE_KEYS[key], f"{sum(s['end'] for s in per_seed) / len(per_seed):.3f}",
                         _change(worst["steps"]), _change(worst["lr"]), f"{settled} of {len(per_seed)}"])
    for key, s in effect_settling(record).items():
        rows.append(["m²-Mix gain over plain (seed 0; + = better)", PROBE_KEYS[key], f"{s['end']:+.3f}",
                     _change(s["steps"]), _change(s["lr"]), "yes" if s["settled"] else "no"])
    return markdown_table(["arm", "quantity", "at the end (mean)",
                           f"change over the last {_pct(cfg['settle_window'])} of steps (worst seed)",
                           f"change over the last {_pct(cfg['settle_window'])} of Σ lr (worst seed)",
                           f"settled (Σ lr reading, < {_pct(cfg['settle_tolerance'])})"], rows)


def over_training_table(record: Dict, fractions=(0, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)) -> str:
    """Seed 0, at the probed steps nearest to ``fractions`` of the run: logit scale of each arm and the
    regularisers' share at the chosen λ on each arm's features (both arms probe the same steps)."""
    lam = chosen_lambda(record)
    clip = {r["step"]: r for r in seed0(record, "clip") if "probe_share_per_lambda" in r}
    cyclip = {r["step"]: r for r in seed0(record, "cyclip") if "probe_share_per_lambda" in r}
    steps = sorted(set(clip) & set(cyclip))
    last = steps[-1]
    rows = []
    for step in sorted({min(steps, key=lambda s: abs(s - f * last)) for f in fractions}):
        a, b = clip[step], cyclip[step]
        rows.append([step] + [f"{v:.3g}" for v in (a["logit_scale"], b["logit_scale"], lam * a["probe_share_per_lambda"],
                                                   lam * b["probe_share_per_lambda"])])
    return markdown_table(["step", "CLIP logit scale", "CyCLIP logit scale", f"share at λ = {lam:g}, CLIP's features",
                           f"share at λ = {lam:g}, CyCLIP's features"], rows)


def _verdict_cell(v: Optional[Dict]) -> str:
    return "—" if v is None else f"{v['verdict']} ({v['gain']:+.4f})"


def what_moved(committed: Optional[Dict], rerun: Optional[Dict], lam_cell: Optional[Dict], new: Dict) -> str:
    """Which change turned the verdict, one step at a time from the earlier study's committed verdict: the
    rerun of its design on today's code ("core"), then the λ grid (earlier budget, new λ), then the budget
    (new budget, new λ); each step's change of the paired gain in parentheses. Order-dependent: an
    interaction of λ and budget is credited to the budget."""
    if rerun is None or lam_cell is None:
        return "not separated (no earlier-budget cells)"
    if any(v is not None and v["verdict"] == "one seed" for v in (committed, rerun, lam_cell, new)):
        return "— (one seed: no intervals to compare)"
    parts = []
    for label, a, b in (("core", committed, rerun), ("λ grid", rerun, lam_cell), ("budget", lam_cell, new)):
        if a is None or a is b:
            continue
        change = "turned it" if a["verdict"] != b["verdict"] else "kept it"
        parts.append(f"{label} {change} ({b['gain'] - a['gain']:+.4f})")
    return "; ".join(parts)


def then_and_now(record: Dict) -> List[str]:
    """The earlier study's verdicts beside the new ones, with the earlier-budget cells between them."""
    prev = record.get("previous") or {}
    prev_rows = {(v["arm"], v["metric"]): v for v in prev.get("verdicts", [])}
    cells = record.get("baseline_cells") or []
    cfg, lam = record["config"], chosen_lambda(record)
    old_lam = cfg.get("baseline_cyclip_lambda")
    by_lam = {c["lambda"]: {v["metric"]: v for v in c["verdicts"]} for c in cells}
    design = prev.get("design", {})
    differs = _design_differences(design, cells, cfg, record) if prev and cells else []
    header = ["comparison", "claimed effect"]
    if prev:
        header.append(f"earlier study (committed; {design.get('pretrain_steps', '?')} steps, λ {design.get('cyclip_lambda', '?')})")
    if cells:
        header += [f"{cells[0]['steps']} steps, λ {old_lam:g} (rerun)"] + (
            [f"{cells[0]['steps']} steps, λ {lam:g}"] if lam != old_lam else [])
    header += [f"{cfg['pretrain_steps']} steps, λ {lam:g} (new)", "what moved it"]
    rows = []
    for v in record["verdicts"]:
        committed = prev_rows.get((v["arm"], v["metric"]))
        row = [f"{ARMS[v['arm']]} vs {ARMS[v['baseline']]}", METRIC[v["metric"]].label]
        row += [_verdict_cell(committed)] if prev else []
        if v["arm"] == "cyclip":
            rerun, lam_cell = by_lam.get(old_lam, {}).get(v["metric"]), by_lam.get(lam, {}).get(v["metric"])
            row += ([_verdict_cell(rerun)] + ([_verdict_cell(lam_cell)] if lam != old_lam else [])) if cells else []
            moved = what_moved(None if differs else committed, rerun, lam_cell, v)
        else:
            row += ["—"] * ((2 if lam != old_lam else 1) if cells else 0)
            moved = ("not separated: fine-tuning budget, w and the CLIP start changed together" if committed else
                     "— (no earlier verdict)")
        rows.append(row + [_verdict_cell(v), moved])
    lines = [markdown_table(header, rows), ""]
    if cells:
        scales = "; ".join(f"λ {c['lambda']:g}: CLIP {fmean(c['logit_scale']['clip']):.1f}, CyCLIP "
                           f"{fmean(c['logit_scale']['cyclip']):.1f}" for c in cells)
        lines.append(f"Cells: verdict (paired gain, + = better), {len(cells[0]['runs']['clip'])} paired seeds each. "
                     "\"What moved it\" walks from the committed verdict to the new one one change at a time: the "
                     "earlier design rerun on today's code (core), then the new λ at the earlier budget (λ grid), then "
                     "the new budget (budget); an interaction of λ and budget is credited to the budget. Logit scale "
                     f"at the end of the {cells[0]['steps']}-step rerun (mean over seeds): {scales}"
                     + (f" (the earlier study: CLIP {design['clip_logit_scale_end']:g}, CyCLIP "
                        f"{design['cyclip_logit_scale_end']:g})." if "clip_logit_scale_end" in design else "."))
    if prev:
        lines.append(f"Earlier study: {prev.get('source', '?')}.")
    if differs:
        lines.append("The earlier-budget cells are **not** the earlier study's design (" + "; ".join(differs) + "): the "
                     "committed column is context only, and the attribution starts at the rerun.")
    return lines


def _design_differences(design: Dict, cells: List[Dict], cfg: Dict, record: Dict) -> List[str]:
    """How the earlier-budget rerun differs from the earlier study's recorded design (empty: a true rerun)."""
    now = {"pretrain_steps": cells[0]["steps"], "pretrain_batch": cfg["pretrain_batch"],
           "cyclip_lambda": cfg.get("baseline_cyclip_lambda"), "pretrain_lr": record["chosen"]["pretrain"]["cyclip"]["lr"]}
    return [f"{k} {now[k]:g} vs {design[k]:g}" for k in now if k in design and now[k] != design[k]]


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
        f"Rule: a run's quantity has settled when it changes by less than {_pct(cfg['settle_tolerance'])} over the last "
        f"{_pct(cfg['settle_window'])} of the run, read over steps and over the summed learning rate (train/experiments/"
        "study/design.py says why both). Pretraining watches the logit scale; fine-tuning, whose CLIP scale is "
        f"fixed, watches the probe's alignment and uniformity ({cfg['probe_size']} clean val pairs, every "
        f"{cfg['probe_every']} steps and at the last; the verdicts are measured on test). \"vs step\": the record "
        "compared with the last (the last at or before the window's first step).", "",
        verdict, "", settling_table(record), "",
        f"Over training (seed 0): the logit scale and the regularisers' gradient share at the chosen λ = {lam:g} "
        "(stated at the reference batch), measured on each arm's own probe features "
        "(‖∇ λ·(C_in + C_cross)‖ / ‖∇ CLIP‖; a share of 1 means the regularisers pull as hard as CLIP):", "",
        over_training_table(record), "", f"![budget](plots/{plot_name})", "",
        "## Then and now: which change moved which verdict", "", *then_and_now(record), "",
    ]
