"""`python -m train.experiments.study [--config configs/study/cpu.yaml] [--report-only] [key=value ...]` (`make study`): the fair test.

CLIP vs CyCLIP pretraining and plain vs m²-Mix fine-tuning on Fashion-MNIST with per-image captions:

1. data: pretraining pairs, val, a shifted fine-tuning pool (held out from pretraining, attribute-only
   captions, half the images corrupted) and the full test split, clean + 12 corrupted copies;
2. tuning on val (seed = first seed): learning rate for CLIP; for CyCLIP λ (stated at
   ``cyclip_reference_batch``) at the first learning rate, then the learning rate at the best λ
   (coordinate search); then, from the chosen CLIP pretraining, learning rate for plain fine-tuning
   and, likewise, w then learning rate for m²-Mix, both with the reference's fine-tuning settings;
3. the chosen configuration of every arm with every seed (pretraining seed s → fine-tuning seed s);
4. the papers' metrics on test (train/experiments/study/evaluation.py, through train/evaluate), the
   regularisers' gradient share on real features, caption diversity; then OUT/REPORT.md with the paired
   verdicts of train/experiments/claims.py and plots (train/experiments/study/report.py).

The pretraining budget is a stated cap; the probe (lib.Probe) records the logit scale, the regularisers'
gradient share, alignment and uniformity over training, and design.py's rule says whether they settled.
The grids of λ and w are extended while their val best sits at an edge. The earlier budget
(``baseline_pretrain_steps``) is rerun for CLIP and CyCLIP to tell which change moved which verdict.

Every run trains through the trainer's core (train/core/inprocess.py; settings in config.py). Every finished
run and evaluation is saved (OUT/runs/<name>/: run.json, model.pt, eval.json), so an interrupted study
resumes; a saved run of another configuration, data split, probe or older format (lib.RUN_FORMAT) is
retrained. ``--report-only`` rewrites REPORT.md and the plots from OUT/results.json and the saved runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from common.config_loader import load_config
from common.errors import UserError
from common.paths import REPO_ROOT
from pipeline.demo.source import CLASSNAMES, TEMPLATES
from train.evaluate.data import encode_texts, logit_scale_of
from train.experiments import claims
from train.config import OptimConfig
from train.experiments.study import design, evaluation, lib
from train.experiments.study.config import StudyConfig
from train.losses.diagnostics import regulariser_share

ROOT = REPO_ROOT


def arm_name(stage: str, arm: str, lr: float, seed: int, extra: str = "") -> str:
    return f"{stage}_{arm}_lr{lr:g}{extra}_s{seed}"


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = torch.device(cfg.device)
        torch.set_num_threads(cfg.threads)
        self.t0 = time.perf_counter()
        self.timings: Dict[str, float] = {}
        self.fresh = 0    # runs trained and evaluations computed by this invocation (0: everything reused)
        self.run_seconds: Dict[str, float] = {}
        cfg.check_sizes(max_k=max(evaluation.EVAL.consistency_ks))
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise UserError(f"out={cfg.out}: a file, not a folder")
        self.log(f"study -> {self.out} on {cfg.device}")
        self.previous = load_previous(self.cfg.previous_verdicts, self.log)
        self.out.mkdir(parents=True, exist_ok=True)
        # Models and the data cache stay out of git; REPORT.md, results.json and plots/ are the record.
        (self.out / ".gitignore").write_text("runs/\ncache/\n*.tmp\n")
        self.data = lib.build_data(self.out / "cache", {"pretrain": cfg.pretrain_size, "val": cfg.val_size,
                                                        "finetune": cfg.finetune_size, "test": cfg.test_size},
                                   log=self.log)
        _, self.preprocess, self.tokenizer = lib.new_model("cpu")
        self.tokens = {k: lib.Tokens(self.tokenizer, self.data[k].captions) for k in ("pretrain", "finetune")}

    def log(self, msg: str) -> None:
        print(f"[study {time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    # ---------------------------------------------------------------- runs (resumable)
    def run(self, name: str, spec: lib.RunSpec, split: str) -> Dict:
        """Train (unless saved with the same ``spec.record()``), score val top-1; returns run.json's contents:
        {"name", "val_top1", "records", "seconds", "config"}. The records carry the training probe (lib.Probe)."""
        folder = self.out / "runs" / name
        config = spec.record()
        if (folder / "run.json").is_file() and (folder / "model.pt").is_file():
            saved = json.loads((folder / "run.json").read_text())
            if saved["config"] == config:
                self.run_seconds[name] = saved["seconds"]
                return saved
            changed = sorted(k for k in set(config) | set(saved["config"]) if config.get(k) != saved["config"].get(k))
            self.log(f"{name}: the saved run differs in {', '.join(changed)}: retraining")
        t, c = time.perf_counter(), self.cfg
        probe = lib.Probe(self.data["val"], self.tokenizer, self.preprocess, c.probe_size, c.probe_every,
                          spec.optim.steps - 1, c.cyclip_reference_batch, spec.optim.max_logit_scale, self.device)
        model, records = lib.train_run(spec, self.data[split], self.tokens[split], self.device, self.log, probe)
        (folder / "eval.json").unlink(missing_ok=True)    # the evaluation of the weights replaced here
        lib.save_model(model, folder / "model.pt", spec.optim.max_logit_scale)
        self.fresh += 1
        info = {"name": name, "val_top1": evaluation.val_top1(model, self.tokenizer, self.preprocess, self.data),
                "records": records, "seconds": time.perf_counter() - t, "config": config}
        lib.save_json(folder / "run.json", info)
        self.run_seconds[name] = info["seconds"]
        self.log(f"{name}: val top-1 {info['val_top1']:.4f}, final loss {records[-1]['loss']:.4f}, "
                 f"scale {records[-1]['logit_scale']:.1f} ({info['seconds']:.0f} s)")
        return info

    def load(self, name: str):
        return lib.new_model(self.device, self.out / "runs" / name / "model.pt")[0].eval()

    def records(self, name: str) -> List[Dict]:
        return json.loads((self.out / "runs" / name / "run.json").read_text())["records"]

    def evaluate(self, name: str) -> Dict:
        """The run's test metrics (evaluation.evaluate_model), saved as runs/<name>/eval.json and reused while
        the run, the data sizes and the k-NN reference are unchanged."""
        path, c = self.out / "runs" / name / "eval.json", self.cfg
        stamp = {"format": lib.RUN_FORMAT, "sizes": [c.pretrain_size, c.val_size, c.finetune_size, c.test_size],
                 "reference_size": c.reference_size}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.pop("study_stamp", None) == stamp:
                return saved
        t = time.perf_counter()
        self.fresh += 1
        result = evaluation.evaluate_model(self.load(name), self.tokenizer, self.preprocess, self.data, c.reference_size)
        lib.save_json(path, {**result, "study_stamp": stamp})
        self.log(f"evaluated {name}: top-1 {result['zero_shot']['top1']:.4f}, shifted "
                 f"{result['robustness']['shifted_top1']:.4f}, ECE {result['zero_shot']['ece']:.4f} "
                 f"({time.perf_counter() - t:.0f} s)")
        return result

    def context(self) -> Dict:
        """What a saved run depends on besides its RunSpec: the data split sizes and the probe's settings."""
        c = self.cfg
        return {"data": [c.pretrain_size, c.val_size, c.finetune_size],
                "probe": {"every": c.probe_every, "size": c.probe_size, "reference_batch": c.cyclip_reference_batch}}

    def pre_spec(self, lr: float, lam: float, seed: int, steps: int = 0) -> lib.RunSpec:
        c = self.cfg
        return lib.RunSpec(c.pretrain_optim(lr, steps), c.pretrain_loss(lam), c.pretrain_batch, seed,
                           context=self.context())

    def ft_spec(self, lr: float, w: float, seed: int, init: str) -> lib.RunSpec:
        c = self.cfg
        return lib.RunSpec(c.finetune_optim(lr), c.finetune_loss(w), c.finetune_batch, seed,
                           self.out / "runs" / init / "model.pt", context=self.context())

    # ---------------------------------------------------------------- stages
    def _grid(self, values: List[float], train, key: str, rows: List[Dict]) -> None:
        """Train ``values`` at the first lr, then extend the grid while its val best sits at an edge
        (design.next_grid_value, at most ``grid_extensions`` values)."""
        for v in values:
            train(v)
        for extension in range(self.cfg.grid_extensions + 1):
            nxt = design.next_grid_value({r[key]: r["val_top1"] for r in rows}, extension, self.cfg.grid_extensions)
            if nxt is None:
                return
            self.log(f"val best of the {key} grid is at its edge: adding {key} = {nxt:.3g}")
            train(float(f"{nxt:.3g}"))

    def tune_pretraining(self) -> Dict:
        """CLIP: every lr. CyCLIP: λ at the first lr (grid extended while its best is at an edge), then the
        other lrs at the best λ (coordinate search)."""
        c, s0 = self.cfg, self.cfg.seeds[0]
        sweep = {"clip": [], "cyclip": []}

        def cyclip(lr, lam):
            info = self.run(arm_name("pre", "cyclip", lr, s0, f"_lam{lam:g}"), self.pre_spec(lr, lam, s0), "pretrain")
            sweep["cyclip"].append({"lr": lr, "lambda": lam, "val_top1": info["val_top1"], "name": info["name"]})

        for lr in c.pretrain_lrs:
            info = self.run(arm_name("pre", "clip", lr, s0), self.pre_spec(lr, 0.0, s0), "pretrain")
            sweep["clip"].append({"lr": lr, "lambda": 0.0, "val_top1": info["val_top1"], "name": info["name"]})
        self._grid(c.cyclip_lambdas, lambda lam: cyclip(c.pretrain_lrs[0], lam), "lambda", sweep["cyclip"])
        best_lam = design.best(sweep["cyclip"], "lambda")["lambda"]
        for lr in c.pretrain_lrs[1:]:
            cyclip(lr, best_lam)
        return sweep

    def tune_finetuning(self, init_of) -> Dict:
        """Plain: every lr. m²-Mix: w at the first lr (grid extended likewise), then the other lrs at the best w."""
        c, s0 = self.cfg, self.cfg.seeds[0]
        sweep = {"plain": [], "m2mix": []}

        def m2mix(lr, w):
            info = self.run(arm_name("ft", "m2mix", lr, s0, f"_w{w:g}"), self.ft_spec(lr, w, s0, init_of(s0)), "finetune")
            sweep["m2mix"].append({"lr": lr, "w": w, "val_top1": info["val_top1"], "name": info["name"]})

        for lr in c.finetune_lrs:
            info = self.run(arm_name("ft", "plain", lr, s0), self.ft_spec(lr, 0.0, s0, init_of(s0)), "finetune")
            sweep["plain"].append({"lr": lr, "w": 0.0, "val_top1": info["val_top1"], "name": info["name"]})
        self._grid(c.m2mix_weights, lambda w: m2mix(c.finetune_lrs[0], w), "w", sweep["m2mix"])
        best_w = design.best(sweep["m2mix"], "w")["w"]
        for lr in c.finetune_lrs[1:]:
            m2mix(lr, best_w)
        return sweep

    def baseline_cells(self, best: Dict) -> List[Dict]:
        """The earlier budget (``baseline_pretrain_steps``) with every seed: CLIP, CyCLIP at the earlier λ and
        (when it differs) at the λ chosen now; each cell judged like the main comparison. Read beside the main
        verdicts, the cells tell the budget's effect from the λ grid's."""
        c = self.cfg
        if not c.baseline_pretrain_steps:
            return []
        steps, tag = c.baseline_pretrain_steps, f"_steps{c.baseline_pretrain_steps}"
        clip_lr, cy_lr = best["clip"]["lr"], best["cyclip"]["lr"]
        clip = [self.run(arm_name("pre", "clip", clip_lr, s, tag), self.pre_spec(clip_lr, 0.0, s, steps), "pretrain")
                for s in c.seeds]
        cells = []
        for lam in dict.fromkeys([c.baseline_cyclip_lambda, best["cyclip"]["lambda"]]):
            cyclip = [self.run(arm_name("pre", "cyclip", cy_lr, s, f"_lam{lam:g}{tag}"),
                               self.pre_spec(cy_lr, lam, s, steps), "pretrain") for s in c.seeds]
            arms = {"clip": clip, "cyclip": cyclip}
            evals = {arm: [self.evaluate(info["name"]) for info in infos] for arm, infos in arms.items()}
            cells.append({"steps": steps, "lambda": lam,
                          "runs": {arm: [info["name"] for info in infos] for arm, infos in arms.items()},
                          "logit_scale": {arm: [info["records"][-1]["logit_scale"] for info in infos]
                                          for arm, infos in arms.items()},
                          "verdicts": [v.as_dict() for v in claims.judge_arms(evals, "cyclip", "clip")]})
        return cells

    def main(self) -> Path:
        from train.experiments.study import report as study_report

        c = self.cfg
        t = time.perf_counter()
        pre_sweep = self.tune_pretraining()
        best = {arm: design.best(rows, "lambda") for arm, rows in pre_sweep.items()}
        self.log("chosen on val: " + ", ".join(f"{a} lr={b['lr']:g} λ={b['lambda']:g}" for a, b in best.items()))
        pre_runs = {arm: [arm_name("pre", arm, b["lr"], s, f"_lam{b['lambda']:g}" if arm == "cyclip" else "")
                          for s in c.seeds] for arm, b in best.items()}
        for arm, b in best.items():
            for s, name in zip(c.seeds, pre_runs[arm]):
                self.run(name, self.pre_spec(b["lr"], b["lambda"], s), "pretrain")
        self.timings["pretraining"] = time.perf_counter() - t
        t = time.perf_counter()
        init_of = lambda s: pre_runs["clip"][c.seeds.index(s)]
        ft_sweep = self.tune_finetuning(init_of)
        best_ft = {arm: design.best(rows, "w") for arm, rows in ft_sweep.items()}
        ft_runs = {arm: [arm_name("ft", arm, b["lr"], s, f"_w{b['w']:g}" if arm == "m2mix" else "") for s in c.seeds]
                   for arm, b in best_ft.items()}
        for arm, b in best_ft.items():
            for s, name in zip(c.seeds, ft_runs[arm]):
                self.run(name, self.ft_spec(b["lr"], b["w"], s, init_of(s)), "finetune")
        self.timings["fine-tuning"] = time.perf_counter() - t
        t = time.perf_counter()
        evals = {arm: [self.evaluate(n) for n in names] for arm, names in {**pre_runs, **ft_runs}.items()}
        self.timings["evaluation"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = self.baseline_cells(best)
        self.timings["baseline budget"] = time.perf_counter() - t
        t = time.perf_counter()
        extras = {"grad_share": self.grad_share(pre_runs["clip"][0]), "captions": self.caption_stats(pre_runs["clip"][0])}
        self.timings["diagnostics"] = time.perf_counter() - t
        self.timings["total"] = time.perf_counter() - self.t0
        timings, machine = self.timings, study_report.machine()
        earlier = self.out / "results.json"
        if not self.fresh and earlier.is_file():
            # nothing was trained or evaluated now: the time and machine stay those of the run that did
            kept = json.loads(earlier.read_text())
            timings, machine = kept.get("timings_s", timings), kept.get("machine", machine)
        record = {"config": dataclasses.asdict(c), "run_format": lib.RUN_FORMAT,
                  "optim": {"pretrain": dataclasses.asdict(c.pretrain_optim(best["clip"]["lr"])),
                            "finetune": dataclasses.asdict(c.finetune_optim(best_ft["plain"]["lr"]))},
                  "pretrain_sweep": pre_sweep, "finetune_sweep": ft_sweep,
                  "chosen": {"pretrain": best, "finetune": best_ft}, "runs": {**pre_runs, **ft_runs},
                  "evals": evals, **extras, "timings_s": timings, "machine": machine,
                  "run_seconds": self.run_seconds,
                  "verdicts": [v.as_dict() for pair in (("cyclip", "clip"), ("m2mix", "plain"))
                               for v in claims.judge_arms(evals, *pair)],
                  "settling": settling_of(self.out, {**pre_runs, **ft_runs}, c.settle_window, c.settle_tolerance),
                  "baseline_cells": cells,
                  "previous": self.previous,
                  "training_records": {n: self.records(n) for names in (*pre_runs.values(), *ft_runs.values())
                                       for n in names[:1]}}
        lib.save_json(self.out / "results.json", record)
        report = study_report.write_report(record, self.out)
        self.log(f"done: {report}")
        return report

    # ---------------------------------------------------------------- diagnostics
    def grad_share(self, clip_run: str) -> List[Dict]:
        """‖∇ 0.25·(C_in + C_cross)‖ / ‖∇ CLIP‖ on the features of a random-init and the trained CLIP model."""
        rows = []
        pre = self.data["pretrain"]
        torch.manual_seed(self.cfg.seeds[0])
        for label, model in (("initialisation", lib.new_model(self.device)[0].eval()), ("trained CLIP", self.load(clip_run))):
            scale = logit_scale_of(model)    # a saved model's scale is clamped at max_logit_scale (the export)
            for n in [x for x in self.cfg.grad_share_sizes if x <= len(pre.labels)]:
                image = evaluation.encode(model, self.preprocess, pre, n)
                text = encode_texts(model, self.tokenizer, pre.captions[:n], evaluation.BATCH)
                ratio = regulariser_share(image, text, scale, 0.25)
                rows.append({"features": label, "n": n, "scale": scale, "plain": ratio,
                             "reference": ratio * self.cfg.cyclip_reference_batch / n})
        return rows

    def caption_stats(self, clip_run: str) -> Dict:
        """Distinct strings and within-class text cosine: these captions vs class-template captions."""
        from pipeline.demo.source import caption_diversity

        pre, model = self.data["pretrain"], self.load(clip_run)
        gen = torch.Generator().manual_seed(0)
        template = [TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=gen))].format(CLASSNAMES[int(y)])
                    for y in pre.labels]
        return {"attribute_captions": {**caption_diversity(pre.captions, pre.labels.numpy()),
                                       "within_class_text_cosine": evaluation.within_class_text_cosine(
                                           model, self.tokenizer, pre.captions, pre.labels)},
                "template_captions": {**caption_diversity(template, pre.labels.numpy()),
                                      "within_class_text_cosine": evaluation.within_class_text_cosine(
                                          model, self.tokenizer, template, pre.labels)},
                "finetune_captions": caption_diversity(self.data["finetune"].captions, self.data["finetune"].labels.numpy()),
                "measured_with": clip_run}


def load_previous(relative: str, log=print) -> Optional[Dict]:
    """The earlier study's verdicts (``previous_verdicts``, relative to the repository root), read at the
    start so that a damaged file is said before the study, not after it: a missing file is one warning and
    no such column; "" is none. Raises UserError for a file that is not a verdicts file."""
    if not relative:
        return None
    path = REPO_ROOT / relative
    if not path.is_file():
        log(f"warning: previous_verdicts {path} does not exist: the report has no earlier-study column")
        return None
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict) or not isinstance(previous.get("verdicts"), list):
            raise ValueError("no verdicts list")
    except ValueError as e:
        raise UserError(f"previous_verdicts {path}: not a verdicts file ({e})") from None
    return previous


def settling_of(out: Path, runs: Dict[str, List[str]], window: float, tolerance: float) -> Dict:
    """Per arm and seed, design.settling of the logit scale (pretraining) or of the probe's alignment and
    uniformity (fine-tuning), with each run's own per-step learning rates (from its saved run.json)."""
    result: Dict = {}
    for arm, names in runs.items():
        keys = ["logit_scale"] if arm in ("clip", "cyclip") else ["probe_alignment", "probe_uniformity"]
        for name in names:
            info = json.loads((out / "runs" / name / "run.json").read_text())
            lrs = design.schedule_lrs(OptimConfig(**info["config"]["optim"]))
            for key in keys:
                result.setdefault(arm, {}).setdefault(key, []).append(
                    design.settling(info["records"], key, lrs, window, tolerance))
    return result


def rewrite_report(cfg: StudyConfig) -> Path:
    """REPORT.md and plots again from OUT/results.json and the saved runs, without training: the settling
    readings are recomputed with today's rule and the earlier verdicts reread; every measured number
    (verdicts, evaluations, timings) is the results file's."""
    from train.experiments.study import report as study_report

    out = Path(cfg.out)
    path = out / "results.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: run the study first (without --report-only)")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not a results file ({e})") from None
    c = record["config"]
    c["settle_window"], c["settle_tolerance"] = cfg.settle_window, cfg.settle_tolerance
    names = [n for names in record["runs"].values() for n in names]
    if all((out / "runs" / n / "run.json").is_file() for n in names):
        record["settling"] = settling_of(out, record["runs"], cfg.settle_window, cfg.settle_tolerance)
        trained = [n for names in record["runs"].values() for n in names]
        trained += [r["name"] for sweep in (record["pretrain_sweep"], record["finetune_sweep"]) for rows in sweep.values()
                    for r in rows]
        trained += [n for cell in record.get("baseline_cells", []) for names in cell["runs"].values() for n in names]
        record["run_seconds"] = {n: json.loads((out / "runs" / n / "run.json").read_text())["seconds"]
                                 for n in sorted(set(trained)) if (out / "runs" / n / "run.json").is_file()}
    else:    # a fresh clone: runs/ is not committed
        print(f"{out / 'runs'}: the saved runs are absent; the settling readings stay those of results.json")
    record["previous"] = load_previous(cfg.previous_verdicts)
    lib.save_json(path, record)
    return study_report.write_report(record, out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.experiments.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "study" / "cpu.yaml"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite OUT/REPORT.md and plots from OUT/results.json and the saved runs, no training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of StudyConfig fields")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(StudyConfig, args.config, args.overrides)
    if args.report_only:
        print(rewrite_report(cfg))
        return 0
    Study(cfg).main()
    return 0
