"""OUT/REPORT.md of `python -m train.experiments.demo`: side-by-side tables, plots, and verdicts computed from the numbers.

Arms are the demo's own (it knows which runs are seeds of one arm): fine-tunings of seed s start
from the pretraining of seed s, so their configs differ in ``model.pretrained`` and the generic
`train.evaluate compare` grouping would not pool them. Cells are mean ± sample standard deviation
over seeds, from each run's eval/eval.json, for the metrics of train/experiments/claims.py.

The claimed effects and the verdict rule (paired differences over seeds, 95% t-interval; with one seed
no verdict) are train/experiments/claims.py's, the same as the study's. Runs of one seed pair across arms:
both arms' run lists are in the order of the demo config's ``seeds``.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from common.atomic_files import atomic_write_text
from common.paths import REPO_ROOT
from common.shard_folder import read_manifest
from train.evaluate.report import markdown_table, metric_bars
from train.experiments import claims

Cell = Tuple[float, float, int]


def load_evals(arms: Dict[str, List[Path]]) -> Dict[str, List[Dict]]:
    """{arm: [eval/eval.json of each run, in seed order]}."""
    return {arm: [json.loads((r / "eval" / "eval.json").read_text()) for r in runs] for arm, runs in arms.items()}


def arm_table(arms: Dict[str, List[Path]]) -> Dict[str, Dict[str, Cell]]:
    """{arm: {metric key: (mean, sample sd, n)}} from each run's eval/eval.json (metrics it has)."""
    table = {}
    for arm, evals in load_evals(arms).items():
        table[arm] = {}
        for m in claims.METRICS:
            values = [v for v in (claims.value(e, m.key) for e in evals) if v is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                table[arm][m.key] = (statistics.fmean(values), sd, len(values))
    return table


def comparisons(pre: Dict[str, List[Dict]], fine: Dict[str, List[Dict]]) -> List[Tuple[str, List[claims.Verdict]]]:
    """(title, verdicts) of CyCLIP vs CLIP and of m²-Mix vs plain from each pretraining, on paired seeds."""
    items = [("CyCLIP vs CLIP (pretraining, same data, budget and seeds)",
              claims.judge_arms(pre, "cyclip", "clip", {"cyclip": "CyCLIP", "clip": "CLIP"}))]
    for init in ("CLIP", "CyCLIP"):
        names = {"m2mix": f"m²-Mix ← {init}", "plain": f"plain ← {init}"}
        if all(n in fine for n in names.values()):
            items.append((f"m²-Mix vs plain fine-tuning, both from {init}",
                          claims.judge_arms(fine, "m2mix", "plain", names)))
    return items


def claims_section(pre: Dict[str, List[Dict]], fine: Dict[str, List[Dict]], pre_table: Dict) -> List[str]:
    lines, verdicts = [], []
    for title, judged in comparisons(pre, fine):
        lines += [f"**{title}.**", ""]
        arm_names = {"cyclip": "CyCLIP", "clip": "CLIP", "m2mix": "m²-Mix", "plain": "plain"}
        for v in judged:
            verdicts.append(v)
            lines.append(f"- [{v.status}] " + claims.sentence(v, arm_names[v.claim.arm], arm_names[v.claim.baseline]))
        lines.append("")
    summary = claims.summary(verdicts)
    if not any(v.status == "one seed" for v in verdicts) and any(v.status != "shows" for v in verdicts):
        summary += (" Where an effect does not show, this demo does not reproduce it: the models are tiny, trained "
                    "for minutes on 32 px images, far from the papers' settings; `make study` (study/REPORT.md) is "
                    "the tuned, multi-seed test of these claims.")
    return ["## Do the claimed effects show?", "", summary, "", *regularizer_check(pre_table), ""] + lines


def regularizer_check(pre: Dict) -> List[str]:
    """Whether CyCLIP's terms did their direct job (lower C_in / C_cross on test), whatever the accuracy did."""
    if not all(m in pre.get(a, {}) for a in ("CLIP", "CyCLIP") for m in ("embedding.C_in", "embedding.C_cross")):
        return []
    ratios = {m: pre["CyCLIP"][f"embedding.{m}"][0] / pre["CLIP"][f"embedding.{m}"][0] for m in ("C_in", "C_cross")}
    lower = all(r < 1 for r in ratios.values())
    return [f"The quantities CyCLIP's regularisers penalise: on the test images C_in is {ratios['C_in']:.2f}× and "
            f"C_cross {ratios['C_cross']:.2f}× the CLIP baseline's (means over seeds), so the regularisers "
            + ("did lower what they target; the question is only whether that helps the metrics below."
               if lower else "did **not** lower both of what they target at this budget.")]


def hyperparameters(run_dir: Path) -> Dict[str, str]:
    """The budget and loss of a run, from the config.yaml the trainer saved (what actually ran)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    loss = cfg.loss
    terms = []
    if loss.cyclip_in_modal or loss.cyclip_cross_modal:
        ref = loss.get("cyclip_reference_batch")
        terms.append(f"λ₁={loss.cyclip_in_modal:g}, λ₂={loss.cyclip_cross_modal:g}"
                     + (f" at batch {ref} (applied ×{ref / cfg.data.global_batch_size:g})" if ref else ""))
    if loss.m2mix_weight:
        terms.append(f"m²-Mix w={loss.m2mix_weight:g}, α={loss.m2mix_alpha:g}"
                     + (f", mix scale {loss.m2mix_logit_scale:.3g}" if loss.get("m2mix_logit_scale") else "")
                     + (", w/(epoch+1)" if loss.get("mix_weight_schedule") == "inverse_epoch" else ""))
    if loss.get("clip_logit_scale"):
        terms.append(f"fixed CLIP scale {loss.clip_logit_scale:g}")
    # a fine-tuning's init is RUNS/<pretraining run>/export (or, written before the hub layout, export/model.pt)
    init = "random"
    if cfg.model.pretrained:
        weights = Path(cfg.model.pretrained)
        init = (weights.parent if weights.name == "export" else weights.parent.parent).name
    return {"steps": str(cfg.optim.steps), "global batch": str(cfg.data.global_batch_size),
            "lr": f"{cfg.optim.lr:g}", "warmup": str(cfg.optim.warmup_steps),
            "weight decay": f"{cfg.optim.weight_decay:g}", "init": init,
            "loss": "CLIP" + "".join(f" + {t}" for t in terms)}


def tuning_section(out: Path, profile: str, pre_lr: float, ft_lr: float) -> List[str]:
    configs = REPO_ROOT / "configs" / "demo"
    for path, note in ((out / "tune" / "tuning.json", ""), (configs / f"tuning-{profile}.json", ""),
                       (configs / "tuning-full.json", " — the full profile's sweep, whose learning rates this "
                        "profile reuses")):
        if path.is_file():
            break
    else:
        return ["## Hyperparameter choice", "", "No tuning record was found (`python -m train.experiments.demo --tune`), so the "
                "learning rates are the demo config's values, not tuned on validation data.", ""]
    rec = json.loads(path.read_text())
    chosen = rec["chosen"]
    agree = chosen["pretrain_lr"] == pre_lr and chosen["finetune_lr"] == ft_lr
    rows = [["pretraining (CLIP loss)", r["lr"], r["val_top1"]] for r in rec["pretrain"]]
    rows += [["plain fine-tuning", r["lr"], r["val_top1"]] for r in rec["finetune"]]
    return ["## Hyperparameter choice (validation split only)", "",
            f"Learning rates were chosen by `python -m train.experiments.demo --tune` (`{path.name}`{note}): {rec['metric']}, seed "
            f"{rec['seed']}, the val split carved from the *training* images; the test split was never looked at. "
            "Both arms of each comparison use the chosen value (the sweep ran with the baseline loss). "
            + ("The runs below use the chosen values." if agree else
               f"**The runs below do not use the chosen values** (pretraining lr {pre_lr} vs chosen "
               f"{chosen['pretrain_lr']}, fine-tuning lr {ft_lr} vs chosen {chosen['finetune_lr']})."), "",
            markdown_table(["sweep", "lr", "val zero-shot top-1"], [[a, f"{lr:g}", v] for a, lr, v in rows]), "",
            f"The val split has {rec.get('val_samples', 'a few hundred')} images, so differences of about a percentage "
            "point between learning rates are within its sampling noise: the sweep rules out bad values rather "
            "than finding a sharp optimum.", ""]


def caption_line(data: str) -> str:
    """Caption diversity of the train split (pipeline/demo_source.caption_diversity), one line."""
    from pipeline.demo.source import caption_diversity
    from train.evaluate.data import iter_samples

    samples = [(s.caption, s.label) for s in iter_samples(data, "train")]
    d = caption_diversity([c for c, _ in samples], [lab for _, lab in samples])
    return (f"{d['distinct']} distinct strings over {d['captions']} images ({d['distinct_per_class']:.0f} per class), "
            f"{100 * d['class_only_share']:.0f}% class-only prompts; the rest carry measured per-image attributes "
            "(area, brightness, texture tertiles within the class), synonyms and superclass words")


def copy_plots(runs: Sequence[Path], plots: Path) -> List[str]:
    lines = []
    for run in runs:
        pngs = sorted((run / "eval").glob("*.png"))
        for png in pngs:
            shutil.copyfile(png, plots / f"{run.name}_{png.name}")
        lines.append(f"- `{run.name}`: " + ", ".join(f"[{p.stem}](plots/{run.name}_{p.name})" for p in pngs))
    return lines


def write_report(cfg, out: Path, profile: str, pre_runs, fine_runs, timings: Dict[str, float]) -> Path:
    arms_pre = {"CLIP": [r.run_dir(out) for r in pre_runs if "_clip_" in r.name],
                "CyCLIP": [r.run_dir(out) for r in pre_runs if "_cyclip_" in r.name]}
    arms_fine = {}
    for init, init_label in (("clip", "CLIP"), ("cyclip", "CyCLIP")):
        for method, label in (("plain", "plain"), ("m2mix", "m²-Mix")):
            arms_fine[f"{label} ← {init_label}"] = [r.run_dir(out) for r in fine_runs
                                                    if r.name.startswith(f"ft_{method}_from_{init}_s")]
    pre, fine = arm_table(arms_pre), arm_table(arms_fine)
    pre_evals, fine_evals = load_evals(arms_pre), load_evals(arms_fine)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metric_bars(pre, plots / "pretraining_bars.png")
    metric_bars(fine, plots / "finetuning_bars.png")
    test_eval = pre_evals["CLIP"][0]
    train_m, test_m = read_manifest(cfg.data), read_manifest(f"{cfg.data}_test")
    setup = {arm: hyperparameters(runs[0]) for arm, runs in {**arms_pre, **arms_fine}.items()}
    hp_pre, hp_fine = setup["CLIP"], setup["plain ← CLIP"]
    total = sum(v or 0.0 for k, v in timings.items() if k in ("shards", "training", "evaluation"))
    lines = [
        f"# Demo report ({profile})", "",
        "CLIP vs CyCLIP pretraining, then plain vs m²-Mix fine-tuning of each, on Fashion-MNIST put through the "
        "whole pipeline (URL list → loopback HTTP → img2dataset → WebDataset shards → DeepSpeed ZeRO trainer "
        f"on {cfg.ranks} CPU ranks → evaluation). Tiny ViT (`configs/model/tiny_vit.json`), 32 px.", "",
        "## Data", "",
        f"- captions (train split): {caption_line(cfg.data)}",
        f"- train: {train_m.splits['train'].num_samples} images, val: {train_m.splits['val'].num_samples} "
        f"(carved from the Fashion-MNIST training images, `{cfg.data}`)",
        f"- test: {test_m.splits['test'].num_samples} held-out Fashion-MNIST test images (`{cfg.data}_test`); "
        f"every model is evaluated on the first {test_eval['dataset']['num_samples']} of them, clean and in each "
        "of the 12 corrupted copies (Gaussian noise, blur, contrast, rotation × severities 1–3).", "",
        "## Setup", "",
        f"Seeds {list(cfg.seeds)} for every arm; fine-tuning seed s starts from the pretraining of seed s. "
        "Same budget within each comparison:", "",
        markdown_table(["arm", *hp_pre.keys()], [[arm, *hp.values()] for arm, hp in setup.items()]),
        "", "(`init`: the pretraining run a fine-tuning starts from, shown for its seed 0.)", ""]
    lines += tuning_section(out, profile, float(hp_pre["lr"]), float(hp_fine["lr"]))
    lines += ["## Results on the test split", "",
              "Mean ± sample standard deviation over seeds (n = seeds). ↑/↓: the better direction.", "",
              "### Pretraining", "", claims.results_table(pre_evals), "", "![pretraining](plots/pretraining_bars.png)", "",
              "### Fine-tuning", "", claims.results_table(fine_evals), "", "![fine-tuning](plots/finetuning_bars.png)", ""]
    lines += claims_section(pre_evals, fine_evals, pre)
    parts = [f"{k} {timings[k]:.0f} s" if k in timings else f"{k} not timed (reused from before)"
             for k in ("shards", "training", "evaluation")]
    lines += ["## Time", "",
              f"{total / 60:.1f} min on this machine ({os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f} when the report was written): {', '.join(parts)}. Each stage's time "
              "is from the last demo run in which it did work (a stage resumed after an interruption counts "
              "only its remaining part).",
              "", "## Per-run plots (reliability, corruptions, training curves)", ""]
    lines += copy_plots([p for runs in (*arms_pre.values(), *arms_fine.values()) for p in runs], plots)
    lines += ["", "Per-run numbers: `runs/<run>/eval/eval.json` and `eval.md`.", ""]
    summary = {"pretraining": {a: {m: list(c) for m, c in row.items()} for a, row in pre.items()},
               "finetuning": {a: {m: list(c) for m, c in row.items()} for a, row in fine.items()},
               "arms": {a: [str(p) for p in runs] for a, runs in {**arms_pre, **arms_fine}.items()},
               "timings_s": timings}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "REPORT.md", "\n".join(lines))
    return out / "REPORT.md"
