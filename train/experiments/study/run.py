"""`python -m train.experiments.study [--config configs/study/cpu.yaml] [key=value ...]` (`make study`): the fair test.

CLIP vs CyCLIP pretraining and plain vs m²-Mix fine-tuning on Fashion-MNIST with per-image captions:

1. data: pretraining pairs, val, a shifted fine-tuning pool (held out from pretraining, attribute-only
   captions, half the images corrupted) and the full test split, clean + 12 corrupted copies;
2. tuning on val (seed = first seed): learning rate for CLIP; for CyCLIP λ (stated at
   ``cyclip_reference_batch``) at the first learning rate, then the learning rate at the best λ
   (coordinate search); then, from the chosen CLIP pretraining, learning rate for plain fine-tuning
   and, likewise, w then learning rate for m²-Mix, both with the reference's fine-tuning settings;
3. the chosen configuration of every arm with every seed (pretraining seed s → fine-tuning seed s);
4. the papers' metrics on test (train/experiments/study/lib.py), the regularisers' gradient share on real
   features, caption diversity; then OUT/REPORT.md with paired verdicts and plots (train/experiments/study/report.py).

Every finished run and evaluation is saved (OUT/runs/<name>/), so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from common.config_loader import load_config
from pipeline.demo.source import TEMPLATES, CLASSNAMES
from train.experiments.study import lib
from train.config import LossConfig
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


@dataclass
class StudyConfig:
    out: str = "study"
    """Output folder: runs/, cache/, plots/, REPORT.md, results.json."""
    device: str = "cpu"
    """Torch device (``cuda`` for the GPU profile)."""
    threads: int = 2
    """torch intra-op threads on CPU."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Paired seeds: every arm runs each; the first also does the tuning."""
    pretrain_size: int = 48000
    """Fashion-MNIST training images used as pretraining pairs."""
    val_size: int = 3000
    """Training images held out as val (tuning and temperature fitting)."""
    finetune_size: int = 9000
    """Training images held out from pretraining as the shifted fine-tuning pool."""
    test_size: int = 10000
    """Test images (all 10,000 by default), clean and in each of the 12 corrupted copies."""
    reference_size: int = 10000
    """Pretraining images whose embeddings the k-NN consistency votes over."""
    pretrain_steps: int = 300
    """Optimizer steps per pretraining run."""
    pretrain_batch: int = 256
    """Global batch of pretraining (one process)."""
    pretrain_warmup: int = 30
    """Linear warmup steps before the cosine schedule."""
    pretrain_weight_decay: float = 0.2
    """AdamW weight decay (CLIP's 0.2)."""
    pretrain_lrs: List[float] = field(default_factory=lambda: [1e-3, 3e-3])
    """Learning rates tried on val for each pretraining arm."""
    cyclip_lambdas: List[float] = field(default_factory=lambda: [0.05, 0.25])
    """λ₁ = λ₂ tried on val for CyCLIP, stated at ``cyclip_reference_batch`` (the paper: 0.25 at 512)."""
    cyclip_reference_batch: int = 512
    """N_ref of ``loss.cyclip_reference_batch``: the batch at which the λ values above are stated."""
    finetune_steps: int = 300
    """Optimizer steps per fine-tuning run."""
    finetune_batch: int = 128
    """The m²-Mix reference's batch size."""
    finetune_warmup: int = 30
    """Linear warmup steps of fine-tuning."""
    finetune_weight_decay: float = 0.2
    """AdamW weight decay of fine-tuning."""
    finetune_lrs: List[float] = field(default_factory=lambda: [1e-4, 3e-4])
    """Learning rates tried on val for each fine-tuning arm."""
    m2mix_weights: List[float] = field(default_factory=lambda: [0.02, 0.1])
    """w tried on val (this repo's mean convention: the reference's 0.01 and 0.05)."""
    finetune_clip_scale: float = 100.0
    """Fixed CLIP scale while fine-tuning, both arms (the reference's τ = 0.01)."""
    m2mix_logit_scale: float = 1 / 0.07
    """The reference's separate mix scale (--sep_scale, τ₂ = 0.07)."""
    m2mix_alpha: float = 0.5
    """α of λ ~ Beta(α, α) for m²-Mix (the reference's 0.5)."""
    grad_share_sizes: List[int] = field(default_factory=lambda: [64, 512, 4096, 32768])
    """Global batches at which the regularisers' gradient share is measured on real features."""


def arm_name(stage: str, arm: str, lr: float, seed: int, extra: str = "") -> str:
    return f"{stage}_{arm}_lr{lr:g}{extra}_s{seed}"


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = torch.device(cfg.device)
        torch.set_num_threads(cfg.threads)
        self.t0 = time.perf_counter()
        self.timings: Dict[str, float] = {}
        self.log(f"study -> {self.out} on {cfg.device}")
        self.out.mkdir(parents=True, exist_ok=True)
        # Models and the data cache stay out of git; REPORT.md, results.json and plots/ are the record.
        (self.out / ".gitignore").write_text("runs/\ncache/\n*.tmp\n")
        self.data = lib.build_data(self.out / "cache", {"pretrain": cfg.pretrain_size, "val": cfg.val_size,
                                                        "finetune": cfg.finetune_size, "test": cfg.test_size},
                                   log=self.log)
        _, self.tokenizer = lib.new_model("cpu")
        self.tokens = {k: lib.Tokens(self.tokenizer, self.data[k].captions) for k in ("pretrain", "finetune")}

    def log(self, msg: str) -> None:
        print(f"[study {time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    # ---------------------------------------------------------------- runs (resumable)
    def pretrain_loss(self, lam: float) -> LossConfig:
        return LossConfig(cyclip_in_modal=lam, cyclip_cross_modal=lam,
                          cyclip_reference_batch=self.cfg.cyclip_reference_batch if lam else None)

    def finetune_loss(self, w: float) -> LossConfig:
        c = self.cfg
        epoch_steps = max(1, c.finetune_size // c.finetune_batch)
        return LossConfig(clip_logit_scale=c.finetune_clip_scale, m2mix_weight=w,
                          m2mix_logit_scale=c.m2mix_logit_scale if w else None, m2mix_alpha=c.m2mix_alpha,
                          mix_weight_schedule="inverse_epoch" if w else "constant",
                          schedule_epoch_steps=epoch_steps if w else 0)

    def run(self, name: str, spec: lib.RunSpec, split: str) -> Dict:
        """Train (unless saved), score val top-1; returns {"name", "val_top1", "records", "config"}."""
        folder = self.out / "runs" / name
        config = lib.json.loads(lib.json.dumps({k: v for k, v in dataclasses.asdict(spec).items() if k != "init_state"}))
        if (folder / "run.json").is_file() and (folder / "model.pt").is_file():
            saved = lib.json.loads((folder / "run.json").read_text())
            if saved["config"] == config:
                return saved
            self.log(f"{name}: saved run has another configuration, retraining")
        t = time.perf_counter()
        model, records = lib.train_run(spec, self.data[split], self.tokens[split], self.device, self.log)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        info = {"name": name, "val_top1": lib.val_top1(model, self.tokenizer, self.data, self.device),
                "records": records, "seconds": time.perf_counter() - t,
                "config": config}
        lib.save_json(folder / "run.json", info)
        self.log(f"{name}: val top-1 {info['val_top1']:.4f}, final loss {records[-1]['loss']:.4f}, "
                 f"scale {records[-1]['logit_scale']:.1f} ({info['seconds']:.0f} s)")
        return info

    def load(self, name: str):
        model, _ = lib.new_model(self.device)
        model.load_state_dict(torch.load(self.out / "runs" / name / "model.pt", weights_only=True))
        return model.eval()

    def evaluate(self, name: str) -> Dict:
        path = self.out / "runs" / name / "test.json"
        if path.is_file():
            return lib.json.loads(path.read_text())
        t = time.perf_counter()
        result = lib.evaluate_model(self.load(name), self.tokenizer, self.data, self.device, self.cfg.reference_size)
        lib.save_json(path, result)
        self.log(f"evaluated {name}: top-1 {result['clean']['top1']:.4f}, shifted {result['shifted_top1']:.4f}, "
                 f"ECE {result['clean']['ece']:.4f} ({time.perf_counter() - t:.0f} s)")
        return result

    def pre_spec(self, lr: float, lam: float, seed: int) -> lib.RunSpec:
        c = self.cfg
        return lib.RunSpec(c.pretrain_steps, c.pretrain_batch, lr, c.pretrain_warmup, c.pretrain_weight_decay,
                           self.pretrain_loss(lam), seed)

    def ft_spec(self, lr: float, w: float, seed: int, init: str) -> lib.RunSpec:
        c = self.cfg
        state = torch.load(self.out / "runs" / init / "model.pt", weights_only=True)
        return lib.RunSpec(c.finetune_steps, c.finetune_batch, lr, c.finetune_warmup, c.finetune_weight_decay,
                           self.finetune_loss(w), seed, state)

    # ---------------------------------------------------------------- stages
    def tune_pretraining(self) -> Dict:
        """CLIP: every lr. CyCLIP: coordinate search, every λ at the first lr, then the other lrs at the best λ."""
        c, s0 = self.cfg, self.cfg.seeds[0]
        sweep = {"clip": [], "cyclip": []}

        def cyclip(lr, lam):
            info = self.run(arm_name("pre", "cyclip", lr, s0, f"_lam{lam:g}"), self.pre_spec(lr, lam, s0), "pretrain")
            sweep["cyclip"].append({"lr": lr, "lambda": lam, "val_top1": info["val_top1"], "name": info["name"]})

        for lr in c.pretrain_lrs:
            info = self.run(arm_name("pre", "clip", lr, s0), self.pre_spec(lr, 0.0, s0), "pretrain")
            sweep["clip"].append({"lr": lr, "lambda": 0.0, "val_top1": info["val_top1"], "name": info["name"]})
        for lam in c.cyclip_lambdas:
            cyclip(c.pretrain_lrs[0], lam)
        best_lam = max(sweep["cyclip"], key=lambda r: r["val_top1"])["lambda"]
        for lr in c.pretrain_lrs[1:]:
            cyclip(lr, best_lam)
        return sweep

    def tune_finetuning(self, init_of) -> Dict:
        """Plain: every lr. m²-Mix: every w at the first lr, then the other lrs at the best w."""
        c, s0 = self.cfg, self.cfg.seeds[0]
        sweep = {"plain": [], "m2mix": []}

        def m2mix(lr, w):
            info = self.run(arm_name("ft", "m2mix", lr, s0, f"_w{w:g}"), self.ft_spec(lr, w, s0, init_of(s0)), "finetune")
            sweep["m2mix"].append({"lr": lr, "w": w, "val_top1": info["val_top1"], "name": info["name"]})

        for lr in c.finetune_lrs:
            info = self.run(arm_name("ft", "plain", lr, s0), self.ft_spec(lr, 0.0, s0, init_of(s0)), "finetune")
            sweep["plain"].append({"lr": lr, "w": 0.0, "val_top1": info["val_top1"], "name": info["name"]})
        for w in c.m2mix_weights:
            m2mix(c.finetune_lrs[0], w)
        best_w = max(sweep["m2mix"], key=lambda r: r["val_top1"])["w"]
        for lr in c.finetune_lrs[1:]:
            m2mix(lr, best_w)
        return sweep

    def main(self) -> Path:
        from train.experiments.study import report as study_report

        c = self.cfg
        t = time.perf_counter()
        pre_sweep = self.tune_pretraining()
        best = {arm: max(rows, key=lambda r: r["val_top1"]) for arm, rows in pre_sweep.items()}
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
        best_ft = {arm: max(rows, key=lambda r: r["val_top1"]) for arm, rows in ft_sweep.items()}
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
        extras = {"grad_share": self.grad_share(pre_runs["clip"][0]), "captions": self.caption_stats(pre_runs["clip"][0])}
        self.timings["diagnostics"] = time.perf_counter() - t
        self.timings["total"] = time.perf_counter() - self.t0
        record = {"config": dataclasses.asdict(c), "pretrain_sweep": pre_sweep, "finetune_sweep": ft_sweep,
                  "chosen": {"pretrain": best, "finetune": best_ft}, "runs": {**pre_runs, **ft_runs},
                  "evals": evals, **extras, "timings_s": self.timings,
                  "training_records": {n: lib.json.loads((self.out / "runs" / n / "run.json").read_text())["records"]
                                       for names in (*pre_runs.values(), *ft_runs.values()) for n in names[:1]}}
        lib.save_json(self.out / "results.json", record)
        report = study_report.write_report(record, self.out)
        self.log(f"done: {report}")
        return report

    # ---------------------------------------------------------------- diagnostics
    def grad_share(self, clip_run: str) -> List[Dict]:
        """‖∇ 0.25·(C_in + C_cross)‖ / ‖∇ CLIP‖ on the features of a random-init and the trained CLIP model."""
        from benchmarks.bench_loss_balance import clip_feature_grads, regulariser_grads

        rows = []
        pre = self.data["pretrain"]
        for label, model in (("initialisation", lib.new_model(self.device)[0].eval()), ("trained CLIP", self.load(clip_run))):
            scale = float(model.logit_scale.detach().exp().reshape(-1)[0].clamp(max=100))
            for n in [x for x in self.cfg.grad_share_sizes if x <= len(pre.labels)]:
                image = lib.encode_images(model, pre.images[:n], self.device)
                text = lib.encode_texts(model, self.tokenizer, pre.captions[:n], self.device)
                gi, gt = clip_feature_grads(image, text, scale)
                ri, rt = regulariser_grads(image, text, 0.25)
                ratio = math.sqrt(float(ri.square().sum() + rt.square().sum()) / float(gi.square().sum() + gt.square().sum()))
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
                                       "within_class_text_cosine": lib.within_class_text_cosine(
                                           model, self.tokenizer, pre.captions, pre.labels, self.device)},
                "template_captions": {**caption_diversity(template, pre.labels.numpy()),
                                      "within_class_text_cosine": lib.within_class_text_cosine(
                                          model, self.tokenizer, template, pre.labels, self.device)},
                "finetune_captions": caption_diversity(self.data["finetune"].captions, self.data["finetune"].labels.numpy()),
                "measured_with": clip_run}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.experiments.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "study" / "cpu.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of StudyConfig fields")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(StudyConfig, args.config, args.overrides)
    Study(cfg).main()
    return 0
