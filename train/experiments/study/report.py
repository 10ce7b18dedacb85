"""study/REPORT.md and plots from results.json: paired verdicts per claimed effect, with 95% CIs.

The claims, the metrics and the verdict rule are train/experiments/claims.py's (shared with the demo); the
results are the evaluator's keys (train/experiments/study/evaluation.py).
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.atomic_files import atomic_write_text  # noqa: E402
from common.machine import cpu_name  # noqa: E402
from train.evaluate.report import markdown_table  # noqa: E402
from train.experiments import claims  # noqa: E402
from train.experiments.claims import ARMS  # noqa: E402
from train.experiments.study import report_budget  # noqa: E402

PAIRS = [("cyclip", "clip"), ("m2mix", "plain")]


def verdicts_of(evals: Dict[str, List[Dict]]) -> List[claims.Verdict]:
    """Every registered claim of the study's two comparisons, judged on its paired seeds."""
    return [v for arm, base in PAIRS for v in claims.judge_arms(evals, arm, base)]


def verdicts_table(verdicts: List[claims.Verdict]) -> str:
    return claims.verdict_table([(f"{ARMS[v.claim.arm]} vs {ARMS[v.claim.baseline]}", v) for v in verdicts])


# ---------------------------------------------------------------- plots
def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def corruption_plot(evals, path: Path) -> str:
    shifts = sorted(evals["clip"][0]["shift"])
    corruptions = shifts
    fig, axes = plt.subplots(1, len(corruptions), figsize=(4 * len(corruptions), 3.6), sharey=True)
    for ax, corr in zip(axes, corruptions):
        for i, arm in enumerate(ARMS):
            ys, es = [], []
            for sev in range(4):
                vals = [e["zero_shot"]["top1"] if sev == 0 else e["shift"][corr][str(sev)]["top1"] for e in evals[arm]]
                ys.append(statistics.fmean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0)
            ax.errorbar([x + 0.05 * (i - 1.5) for x in range(4)], ys, yerr=es, marker="o", capsize=3, label=ARMS[arm])
        ax.set(title=corr, xlabel="severity (0 = clean)", xticks=range(4))
    axes[0].set_ylabel("zero-shot top-1 (mean ± sd over seeds)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def reliability_plot(evals, path: Path) -> str:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    for ax, arm in zip(axes, ARMS):
        cal = evals[arm][0]["calibration"]
        edges = cal["edges"]
        width = edges[1] - edges[0]
        centers = [lo + width / 2 for lo in edges[:-1]]
        ax.bar(centers, [0 if math.isnan(a) else a for a in cal["accuracy"]], width=width, edgecolor="black", alpha=0.8)
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ece = evals[arm][0]["zero_shot"]["ece"]
        ax.set(title=f"{ARMS[arm]} (seed 0, ECE {ece:.3f})", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    return _save(fig, path)


def sweep_plot(record, path: Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    pre = record["pretrain_sweep"]
    for lr in sorted({r["lr"] for r in pre["cyclip"]}):
        pts = [(0.0, r["val_top1"]) for r in pre["clip"] if r["lr"] == lr] + \
              sorted((r["lambda"], r["val_top1"]) for r in pre["cyclip"] if r["lr"] == lr)
        left.plot(*zip(*pts), marker="o", label=f"lr {lr:g}")
    left.set_xscale("symlog", linthresh=0.01)
    left.set(xlabel=f"CyCLIP λ₁ = λ₂ (at reference batch {record['config']['cyclip_reference_batch']}; 0 = CLIP)",
             ylabel="val zero-shot top-1", title="Pretraining sweep (seed 0)")
    left.legend()
    ft = record["finetune_sweep"]
    for lr in sorted({r["lr"] for r in ft["m2mix"]}):
        pts = [(0.0, r["val_top1"]) for r in ft["plain"] if r["lr"] == lr] + \
              sorted((r["w"], r["val_top1"]) for r in ft["m2mix"] if r["lr"] == lr)
        right.plot(*zip(*pts), marker="o", label=f"lr {lr:g}")
    right.set_xscale("symlog", linthresh=0.01)
    right.set(xlabel="m²-Mix weight w (0 = plain)", ylabel="val zero-shot top-1", title="Fine-tuning sweep (seed 0)")
    right.legend()
    return _save(fig, path)


def curves_plot(record, path: Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, recs in record["training_records"].items():
        steps = [r["step"] for r in recs]
        left.plot(steps, [r["clip"] for r in recs], label=name)
        right.plot(steps, [r["logit_scale"] for r in recs], label=name)
    left.set(xlabel="step", ylabel="CLIP loss term", title="Training (seed 0 of each arm)")
    right.set(xlabel="step", ylabel="logit scale used")
    left.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- REPORT.md
def sweep_tables(record) -> List[str]:
    pre, ft, chosen = record["pretrain_sweep"], record["finetune_sweep"], record["chosen"]
    rows = [["CLIP", f"{r['lr']:g}", "0", f"{r['val_top1']:.4f}"] for r in pre["clip"]]
    rows += [["CyCLIP", f"{r['lr']:g}", f"{r['lambda']:g}", f"{r['val_top1']:.4f}"] for r in pre["cyclip"]]
    rows_ft = [["plain", f"{r['lr']:g}", "0", f"{r['val_top1']:.4f}"] for r in ft["plain"]]
    rows_ft += [["m²-Mix", f"{r['lr']:g}", f"{r['w']:g}", f"{r['val_top1']:.4f}"] for r in ft["m2mix"]]
    c = chosen
    return [markdown_table(["arm", "lr", "λ₁ = λ₂ (at ref. batch)", "val top-1"], rows), "",
            markdown_table(["arm", "lr", "w", "val top-1"], rows_ft), "",
            "CyCLIP and m²-Mix are tuned by coordinate search: λ (w) at the first learning rate, then the other "
            "learning rates at the best λ (w) (one learning rate: a grid over λ (w) alone). While the val best "
            f"sits at a grid's edge, the grid is extended (×2.5 above, ×0.5 below, at most "
            f"{record['config'].get('grid_extensions', 0)} added; train/experiments/study/design.py)." + _edge_note(record),
            f"Chosen (best val top-1 of each arm): CLIP lr {c['pretrain']['clip']['lr']:g}; CyCLIP lr "
            f"{c['pretrain']['cyclip']['lr']:g}, λ {c['pretrain']['cyclip']['lambda']:g}; plain lr "
            f"{c['finetune']['plain']['lr']:g}; m²-Mix lr {c['finetune']['m2mix']['lr']:g}, w {c['finetune']['m2mix']['w']:g}.",
            _noise_line(record)]


def _noise_line(record) -> str:
    """The val split's binomial standard error at the chosen CLIP's val top-1 p: √(p(1 − p)/n)."""
    n, p = record["config"]["val_size"], record["chosen"]["pretrain"]["clip"]["val_top1"]
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return (f"The val split has {n} images: the standard error of a top-1 near {p:.2f} is {se:.3f}, so sweep "
            f"differences below ~{2.5 * se:.3f} do not rank settings reliably.")


def _edge_note(record) -> str:
    from train.experiments.study.design import at_edge

    notes = []
    for stage, arm, key, name in (("pretrain_sweep", "cyclip", "lambda", "λ"), ("finetune_sweep", "m2mix", "w", "w")):
        rows = record[stage][arm]
        first_lr = rows[0]["lr"]
        scores = {r[key]: r["val_top1"] for r in rows if r["lr"] == first_lr}
        if at_edge(scores):
            notes.append(f"{name}'s best is still at its grid's edge")
    if not notes:
        return " Both grids bracket their val best."
    spent = " (extensions spent)" if record["config"].get("grid_extensions") else " (no extensions allowed)"
    return " " + "; ".join(notes) + spent + "."


def machine() -> Dict:
    """The machine a study ran on, stored in results.json when it trained (a rerun that reuses every run
    keeps the earlier one)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1)}


def _time_lines(record) -> List[str]:
    t, m = record["timings_s"], record.get("machine") or machine()
    lines = [f"{t['total'] / 60:.1f} min in total on {m['cpu']} ({m['cores']} cores, load average {m['load_average']:.1f} "
             "at the end): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items() if k != "total")
             + " (stages reused from an interrupted run count only their remaining part)."]
    seconds = record.get("run_seconds") or {}
    if seconds:
        slowest = max(seconds, key=seconds.get)
        lines.append(f"Each training run's own time is in results.json (`run_seconds`): {len(seconds)} runs, "
                     f"{sum(seconds.values()) / 60:.1f} min together, the longest {slowest} at {seconds[slowest]:.0f} s.")
    return lines


def _optimizer_line(optim: Optional[Dict]) -> List[str]:
    """The trainer's optimizer settings the runs used (OptimConfig; absent from results of format 1)."""
    if not optim:
        return []
    o = optim["pretrain"]
    return [f"- Optimizer (the trainer's core, train/core/inprocess.py): AdamW β = ({o['beta1']:g}, {o['beta2']:g}), "
            f"eps {o['eps']:g}{' (fused kernel)' if o['fused_adamw'] else ''}, cosine schedule to min_lr "
            f"{o['min_lr']:g}, gradient clipping at {o['grad_clip']:g}, logit scale clamped at {o['max_logit_scale']:g}; "
            "a non-finite step is skipped as the trainer does."]


def _design_section(cfg: Dict, optim: Optional[Dict] = None) -> List[str]:
    return [
        f"- Data: {cfg['pretrain_size']} pretraining pairs, {cfg['val_size']} val images (tuning, temperature fitting), "
        f"{cfg['finetune_size']} held-out fine-tuning pairs, the {cfg['test_size']} Fashion-MNIST test images clean and in "
        "12 corrupted copies (Gaussian noise, blur, contrast, rotation × severity 1–3).",
        "- Captions carry per-image information (pipeline/demo/source.py): measured object area, brightness and "
        "texture as within-class tertiles, synonyms and superclass words; 25% stay class-only prompts.",
        f"- Pretraining: {cfg['pretrain_steps']} steps × batch {cfg['pretrain_batch']} "
        f"({cfg['pretrain_steps'] * cfg['pretrain_batch'] / cfg['pretrain_size']:.1f} epochs), cosine schedule, warmup "
        f"{cfg['pretrain_warmup']}, weight decay {cfg['pretrain_weight_decay']}; CyCLIP λ is stated at the paper's batch "
        f"{cfg['cyclip_reference_batch']} (`loss.cyclip_reference_batch`: applied λ·{cfg['cyclip_reference_batch']}/N). "
        "The budget is a stated cap; whether CLIP's logit scale settled by then is the next section's rule."
        + (f" The earlier budget ({cfg['baseline_pretrain_steps']} steps) is rerun with every seed for CLIP and for "
           f"CyCLIP at the earlier λ {cfg['baseline_cyclip_lambda']:g} and at the λ chosen now, to separate the "
           "two changes." if cfg.get("baseline_pretrain_steps") else ""),
        f"- Fine-tuning (from the CLIP pretraining of the same seed) on the *shifted* pool: attribute-only captions, "
        f"half the images corrupted; {cfg['finetune_steps']} steps × batch {cfg['finetune_batch']}, both arms with the "
        f"reference's fixed CLIP scale {cfg['finetune_clip_scale']:g}; m²-Mix with the reference's separate mix scale "
        f"{cfg['m2mix_logit_scale']:.2f}, λ ~ Beta({cfg['m2mix_alpha']}, {cfg['m2mix_alpha']}) per step and the 1/(epoch+1) "
        "weight schedule (`--schedule`).",
        *_optimizer_line(optim),
        f"- Learning rate (and λ or w) tuned on val per arm with seed {cfg['seeds'][0]}; then seeds {cfg['seeds']} for "
        "every arm, paired (same seed = same data order and, for fine-tuning, the same initial weights).",
        "- Metrics are the papers' own: CyCLIP consistency = agreement of the zero-shot prediction with the k-NN vote "
        f"over {cfg['reference_size']} *training* image embeddings, mean over k ∈ {{1, 3, 5, 10, 30}}; ECE (15 bins) and "
        "NLL before and after temperature scaling fitted on val; retrieval over the test captions (identical strings "
        "merged; `label`: any caption of the same class counts); alignment and uniformity (Wang & Isola).", "",
    ]


def _captions_and_share_sections(record: Dict) -> List[str]:
    cap = record["captions"]
    share_rows = [[r["features"], r["n"], f"{r['scale']:.1f}", f"{r['plain']:.3g}", f"{r['reference']:.3g}"]
                  for r in record["grad_share"]]
    return [
        "## Captions", "",
        markdown_table(["captions", "distinct strings", "distinct per class", "class-only share", "within-class text cosine"],
                       [[k.replace("_", " "), v["distinct"], f"{v['distinct_per_class']:.0f}", f"{v['class_only_share']:.2f}",
                         f"{v['within_class_text_cosine']:.3f}"] for k, v in cap.items() if isinstance(v, dict)
                        and "within_class_text_cosine" in v]), "",
        f"Text cosine measured with the text encoder of `{cap['measured_with']}`; the template row re-captions the "
        "same pretraining images with the old class-template captions (80 strings) for comparison.", "",
        "## CyCLIP regularisers' gradient share on this model's real features", "",
        "‖∇ 0.25·(C_in + C_cross)‖ / ‖∇ CLIP‖ w.r.t. the features of N pretraining pairs (benchmarks/bench_loss_balance.py "
        "has the synthetic d = 512 table):", "",
        markdown_table(["features", "N", "logit scale", "share, λ as given", "share, λ·512/N"], share_rows), "",
    ]


def write_report(record: Dict, out: Path) -> Path:
    """study/REPORT.md (and its plots under ``out/plots``) from the study's results record."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    evals, cfg = record["evals"], record["config"]
    names = {"corr": corruption_plot(evals, plots / "accuracy_per_corruption.png"),
             "rel": reliability_plot(evals, plots / "reliability_seed0.png"),
             "sweep": sweep_plot(record, plots / "sweeps.png"), "curves": curves_plot(record, plots / "training_seed0.png"),
             "budget": report_budget.budget_plot(record, plots / "budget.png")}
    verdicts = verdicts_of(evals)
    lines = [
        "# Study: do the papers' claimed effects show? (`make study`)", "",
        "CLIP vs CyCLIP pretraining (Goel et al., 2022) and plain vs m²-Mix fine-tuning (Oh et al., 2023) of the tiny "
        "open_clip ViT (`configs/model/tiny_vit.json`, 32 px) on Fashion-MNIST with per-image captions. Written by "
        "`python -m train.experiments.study` (train/experiments/study/run.py); every number below comes from `results.json` next to this file.", "",
        "## Design", "", *_design_section(cfg, record.get("optim")),
        "## Verdicts per claimed effect", "", claims.summary(verdicts), "", verdicts_table(verdicts), "",
        "Rule: paired differences over seeds, 95% t-interval (train/experiments/claims.py, shared with the demo). An "
        "effect that is "
        "not resolved is not shown to be absent: it is smaller than this design (tiny model, ~minutes of CPU "
        "training per arm, n seeds) can separate from seed noise.", "",
        *report_budget.budget_sections(record, names["budget"]),
        "## Results on the test split (mean ± sd over seeds)", "", claims.results_table({ARMS[a]: evals[a] for a in ARMS}), "",
        f"![accuracy per corruption](plots/{names['corr']})", "", f"![reliability](plots/{names['rel']})", "",
        "## Tuning on val (seed 0)", "", *sweep_tables(record), "", f"![sweeps](plots/{names['sweep']})", "",
        f"![training](plots/{names['curves']})", "",
        *_captions_and_share_sections(record),
        "## Time", "",
        *_time_lines(record), ""]
    return atomic_write_text(out / "REPORT.md", "\n".join(lines))
