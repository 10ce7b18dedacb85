"""eval.json, eval.md and PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from common.atomic_files import atomic_write_text  # noqa: E402

LOSS_TERMS = ("loss", "clip", "cyclip_in", "cyclip_cross", "m2mix")


def fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


FORMAT_NAMES = {"manifest": "dataset folder", "clip_benchmark": "CLIP_benchmark webdataset format"}


def eval_markdown(results: Dict, title: str = "Evaluation") -> str:
    ds = results["dataset"]
    parts = [f"# {title}", "",
             f"Dataset `{ds['folder']}` ({FORMAT_NAMES.get(ds.get('format'), 'dataset folder')}), "
             f"split `{ds['split']}`: {ds['num_samples']} samples, "
             f"{ds['num_classes']} classes. Logit scale {results['model']['logit_scale']:.2f}.", ""]
    if "zero_shot" in results:
        zs = results["zero_shot"]
        knn = zs.get("consistency_definition") == "knn_train"
        definition = ("Consistency (CyCLIP's definition): the zero-shot prediction agrees with the majority vote of "
                      f"the k nearest *training* image embeddings, mean over k ∈ {{{', '.join(zs['consistency_k'])}}}; "
                      "in-modal top-1 is the k-NN vote's accuracy at k = 10." if knn else
                      "Consistency (fallback, not CyCLIP's definition: no reference_dataset given): the zero-shot "
                      "prediction agrees with the nearest leave-one-out class prototype of the evaluated images.")
        header = ["top-1", "top-5", "mean per-class recall",
                  "ECE (15 bins)" if len(results["calibration"]["count"]) == 15 else "ECE", "NLL"]
        row = [zs["top1"], zs["top5"], zs.get("mean_per_class_recall", math.nan), zs["ece"], zs["nll"]]
        if "temperature" in zs:
            header += ["T (fitted on val)", "ECE after T", "NLL after T"]
            row += [zs["temperature"], zs["ece_ts"], zs["nll_ts"]]
        parts += ["## Zero-shot classification", "",
                  f"Prompt ensemble of {zs['num_templates']} templates; chance top-1 = {zs['chance_top1']:.4f}. "
                  + definition, "",
                  markdown_table(header + ["consistency", "in-modal top-1"],
                                 [row + [zs["consistency"], zs["in_modal_top1"]]]), ""]
        if knn:
            parts += [markdown_table(["k", "consistency", "k-NN top-1"],
                                     [[k, v, zs["knn_top1_k"][k]] for k, v in zs["consistency_k"].items()]), ""]
    if "retrieval" in results:
        r = results["retrieval"]
        parts += ["## Retrieval", "", f"{r['num_images']} images, {r['num_texts']} texts. "
                  f"Relevance (`{r['relevance']}`): {r['relevance_definition']}.", "",
                  markdown_table(["direction", "R@1", "R@5", "R@10"],
                                 [["image→text", r["i2t_R@1"], r["i2t_R@5"], r["i2t_R@10"]],
                                  ["text→image", r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"]]]), ""]
    if "embedding" in results:
        e = results["embedding"]
        parts += ["## Embedding geometry", "", f"Pairs: image with its {e['pairs'].replace('_', ' ')}.", "",
                  markdown_table(["alignment ↓", "uniformity image ↓", "uniformity text ↓", "uniformity union ↓",
                                  "modality gap", "C_in", "C_cross"],
                                 [[e["alignment"], e["uniformity_image"], e["uniformity_text"],
                                   e["uniformity_union"], e["modality_gap"], e["C_in"], e["C_cross"]]]), ""]
    if "shift" in results:
        rows = [[c, s, m["top1"], m["top5"], m["ece"], m.get("ece_ts", math.nan), m["consistency"]]
                for c, sev in results["shift"].items() for s, m in sev.items()]
        rob = results["robustness"]
        parts += ["## Distribution shift", "",
                  f"Clean top-1 {rob['clean_top1']:.4f}; mean shifted top-1 {rob['shifted_top1']:.4f} "
                  f"(drop {rob['drop']:.4f}, {100 * rob['relative']:.1f}% of clean accuracy kept).", "",
                  markdown_table(["corruption", "severity", "top-1", "top-5", "ECE", "ECE after T", "consistency"], rows), ""]
    return "\n".join(parts)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(calibration: Dict, ece: float, path: Path) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with bin counts below."""
    edges = calibration["edges"]
    width = edges[1] - edges[0]
    centers = [lo + width / 2 for lo in edges[:-1]]
    acc = [0.0 if math.isnan(a) else a for a in calibration["accuracy"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, acc, width=width, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set(ylabel="accuracy", ylim=(0, 1), title=f"Reliability diagram (ECE {ece:.4f})")
    top.legend(loc="upper left")
    bottom.bar(centers, calibration["count"], width=width, edgecolor="black", color="tab:orange")
    bottom.set(xlabel="confidence", ylabel="samples", xlim=(0, 1))
    return _save(fig, path)


def corruption_plot(results: Dict, path: Path) -> Path:
    """Zero-shot top-1 against severity, one line per corruption, with the clean accuracy as reference."""
    fig, ax = plt.subplots(figsize=(6, 4))
    clean = results["zero_shot"]["top1"]
    for corruption, sev in results["shift"].items():
        xs = [int(s) for s in sev]
        ax.plot([0] + xs, [clean] + [m["top1"] for m in sev.values()], marker="o", label=corruption)
    ax.axhline(results["zero_shot"]["chance_top1"], color="gray", ls=":", label="chance")
    ax.set(xlabel="severity (0 = clean)", ylabel="zero-shot top-1", title="Accuracy under corruptions", ylim=(0, 1))
    ax.legend()
    return _save(fig, path)


def read_metrics_jsonl(path: Path) -> List[Dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a crash; the rest of the log is still useful
    return rows


def training_curves(rows: List[Dict], path: Path) -> Optional[Path]:
    """Loss terms and exp(logit_scale) against step from a run's metrics.jsonl; None if nothing to plot."""
    steps = [r for r in rows if "step" in r]
    terms = [t for t in LOSS_TERMS if any(t in r for r in steps)]
    evals = sorted({k for r in steps for k in r if k.startswith("eval/")})
    if not terms and not any("logit_scale" in r for r in steps):
        return None
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for term in terms:
        pts = [(r["step"], r[term]) for r in steps if isinstance(r.get(term), (int, float))]
        axes[0].plot(*zip(*pts), label=term)
    axes[0].set(xlabel="step", ylabel="loss", title="Training losses")
    if terms:
        axes[0].legend()
    pts = [(r["step"], r["logit_scale"]) for r in steps if isinstance(r.get("logit_scale"), (int, float))]
    if pts:
        axes[1].plot(*zip(*pts), color="tab:purple")
    axes[1].set(xlabel="step", ylabel="logit scale", title="Logit scale")
    for key in evals:
        pts = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        axes[2].plot(*zip(*pts), marker=".", label=key.removeprefix("eval/"))
    if evals:
        axes[2].set(xlabel="step", title="Periodic evaluation")
        axes[2].legend()
    return _save(fig, path)


def metric_bars(table: Dict[str, Dict[str, tuple]], path: Path) -> Path:
    """One panel per metric, one bar per run group (error bar = spread over seeds)."""
    names = list(table)
    metric_names = sorted({m for row in table.values() for m in row})
    cols = min(4, len(metric_names))
    rows = math.ceil(len(metric_names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metric_names):
        means = [table[n].get(metric, (math.nan, 0.0, 0))[0] for n in names]
        errs = [table[n].get(metric, (math.nan, 0.0, 0))[1] for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [n if len(n) < 18 else n[:16] + "…" for n in names],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metric_names):]:
        ax.axis("off")
    return _save(fig, path)


def write_eval_outputs(results: Dict, out_dir: Path, run_dir: Optional[Path] = None, title: str = "Evaluation"):
    """eval.json, eval.md and every plot this result supports; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=1)),
               atomic_write_text(out_dir / "eval.md", eval_markdown(results, title))]
    if "calibration" in results:
        written.append(reliability_diagram(results["calibration"], results["zero_shot"]["ece"],
                                           out_dir / "reliability.png"))
    if "shift" in results:
        written.append(corruption_plot(results, out_dir / "corruptions.png"))
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        curves = training_curves(read_metrics_jsonl(run_dir / "metrics.jsonl"), out_dir / "training.png")
        if curves:
            written.append(curves)
    return written
