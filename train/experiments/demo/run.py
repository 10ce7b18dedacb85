"""`python -m train.experiments.demo [--fast] [--out DIR] [--tune]`: the whole pipeline on Fashion-MNIST, then a report.

Stages, in order, each announced with its elapsed time:

1. shards: `python -m pipeline demo` (URL list -> loopback HTTP -> img2dataset), skipped when both
   manifests exist;
2. pretraining: the CLIP baseline and CyCLIP (configs/pretrain_*.yaml + the demo's overrides), per seed;
3. fine-tuning: every pretrained model with plain contrastive fine-tuning and with m²-Mix;
4. evaluation: every model on the held-out test split, clean and under the 12 corruptions;
5. OUT/REPORT.md (train/experiments/demo/report.py).

Stages 2+3 are one `torchrun --nproc_per_node 2` launch that runs every training in turn in the same
process group (``train.core.trainer.main`` per run): the ~30 s of imports, DeepSpeed and gloo setup is paid
once, not twelve times. Finished runs (an export at the configured step) and evaluations are skipped,
so an interrupted demo continues where it stopped.

``--tune`` is the only place hyperparameters are chosen: a learning-rate sweep of CLIP pretraining,
then of plain fine-tuning, scored by zero-shot top-1 on the *val* split carved from the training
images (never the test split). It writes OUT/tune/tuning.json; copy the chosen values into the demo
config (configs/demo/*.yaml) and the tuning file next to it (configs/demo/tuning-<profile>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common.config_loader import load_config
from common.jobs import resume_overrides
from common.net import free_port
from common.paths import REPO_ROOT
from train.model.hub import WEIGHTS_FILE
from train.experiments.demo.config import DemoConfig

ROOT = REPO_ROOT
DEMO_CONFIGS = ROOT / "configs" / "demo"
PRETRAIN = {"clip": ROOT / "configs" / "pretrain_clip.yaml", "cyclip": ROOT / "configs" / "pretrain_cyclip.yaml"}
FINETUNE = {"plain": ROOT / "configs" / "finetune_plain.yaml", "m2mix": ROOT / "configs" / "finetune_m2mix.yaml"}


@dataclass
class Run:
    name: str
    config: str
    overrides: List[str]

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.name

    def argv(self, out: Path) -> List[str]:
        # A rerun of the demo continues each stage's own run.
        return ["--config", self.config, *resume_overrides(
            [*self.overrides, f"run.run_dir={self.run_dir(out)}", "logging.tensorboard=false"], restarted=True)]


def log_stage(msg: str, t0: float) -> None:
    print(f"\n=== [demo {time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def test_dir(data: str | Path) -> Path:
    return Path(f"{data}_test")


def build_shards(cfg: DemoConfig) -> bool:
    """Run ingestion unless both dataset folders are complete; returns whether it ran."""
    if (Path(cfg.data) / "manifest.json").is_file() and (test_dir(cfg.data) / "manifest.json").is_file():
        print(f"shards: {cfg.data} and {test_dir(cfg.data)} exist (delete them to rebuild)", flush=True)
        return False
    cmd = [sys.executable, "-m", "pipeline", "demo", "--out", cfg.data, "--port", str(free_port()),
           "--train-per-class", str(cfg.train_per_class), "--test-per-class", str(cfg.test_per_class)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return True


def pretrain_runs(cfg: DemoConfig, seeds: List[int], extra: List[str] = (), methods=("clip", "cyclip"),
                  prefix: str = "pretrain") -> List[Run]:
    return [Run(f"{prefix}_{m}_s{s}", str(PRETRAIN[m]),
                [f"data.path={cfg.data}", *cfg.pretrain_overrides, *(cfg.cyclip_overrides if m == "cyclip" else []),
                 *extra, f"run.seed={s}"])
            for m in methods for s in seeds]


def finetune_runs(cfg: DemoConfig, out: Path, seeds: List[int], init: str = "", extra: List[str] = (),
                  methods=("plain", "m2mix"), prefix: str = "ft") -> List[Run]:
    """Fine-tune from every pretraining arm (``init`` = one fixed run name instead)."""
    runs = []
    for source in ([init] if init else ["clip", "cyclip"]):
        for m in methods:
            for s in seeds:
                init_run = source if init else f"pretrain_{source}_s{s}"
                weights = out / "runs" / init_run / "export"    # open_clip's hub layout (train/model/hub.py)
                name = f"{prefix}_{m}_from_{source if not init else 'best'}_s{s}"
                runs.append(Run(name, str(FINETUNE[m]), [f"data.path={cfg.data}", f"model.pretrained={weights}",
                                                         *cfg.finetune_overrides, *extra, f"run.seed={s}"]))
    return runs


def is_trained(run: Run, out: Path) -> bool:
    """The run's export exists at the final step the demo config asks for."""
    from train.config import TrainConfig

    info = run.run_dir(out) / "export" / "info.json"
    if not info.is_file():
        return False
    steps = load_config(TrainConfig, run.config, run.overrides).optim.steps
    done = json.loads(info.read_text()).get("step")
    if done != steps:  # resuming would mix two budgets in one run
        raise SystemExit(f"{run.run_dir(out)} holds a run of {done} steps but the demo config asks for {steps}: "
                         "delete it or pick another --out")
    return True


def train_all(runs: List[Run], out: Path, ranks: int) -> int:
    """One torchrun launch that trains ``runs`` in order (unfinished ones only); returns how many it trained."""
    todo = [r for r in runs if not is_trained(r, out)]
    for r in runs:
        if r not in todo:
            print(f"train: {r.name} already finished, skipped", flush=True)
    if not todo:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "train_plan.json"
    plan.write_text(json.dumps([{"name": r.name, "argv": r.argv(out)} for r in todo], indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "train.experiments.demo", "worker", str(plan)]
    print("$ " + " ".join(cmd), flush=True)
    # One thread per rank (2 ranks on 2 cores), and DeepSpeed's JIT cache where `make` keeps it: a
    # fresh cache costs a ~45 s compile, and two demos sharing one wait on its lock.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return len(todo)


def worker(plan_file: str) -> int:
    """Inside torchrun: every run of the plan in turn, with a barrier so exports exist before use."""
    import torch.distributed as dist

    from common.errors import EXIT_OK
    from train.core.trainer import main

    plan = json.loads(Path(plan_file).read_text())
    for i, item in enumerate(plan):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n--- training {i + 1}/{len(plan)}: {item['name']}", flush=True)
        t = time.perf_counter()
        summary = main(item["argv"])
        if summary["exit_code"] != EXIT_OK:
            return summary["exit_code"]
        dist.barrier()  # rank 0 writes the export after the others return; fine-tuning reads it next
        if dist.get_rank() == 0:
            last = summary["last"]
            print(f"--- {item['name']}: {summary['step']} steps in {time.perf_counter() - t:.1f} s, final loss "
                  f"{last.get('loss', float('nan')):.4f}", flush=True)
    return 0


def fixed_logit_scale(run_dir: Path) -> float:
    """The fixed CLIP scale a run was trained with (loss.clip_logit_scale), 0 if it learned its own."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    loss = OmegaConf.load(path).get("loss", {}) if path.is_file() else {}
    return float(loss.get("clip_logit_scale") or 0.0)


def evaluate_run(run_dir: Path, dataset: Path, split: str, max_samples: int, batch_size: int,
                 shifted: bool = True, reference: Optional[str] = None, reference_samples: int = 0) -> Tuple[Dict, bool]:
    """``python -m train.evaluate --checkpoint RUN_DIR ...`` in this process, skipped when up to date.

    Returns (eval.json contents, whether it ran)."""
    from train.evaluate.__main__ import main as evaluate_main

    out = run_dir / ("eval" if split == "test" else f"eval_{split}")
    result, stamp = out / "eval.json", out / "demo_eval_args.json"
    model = run_dir / "export" / WEIGHTS_FILE
    args = ["--checkpoint", str(run_dir), f"dataset={dataset}", f"split={split}", f"max_samples={max_samples}",
            f"batch_size={batch_size}", "device=cpu", f"out_dir={out}"] + ([] if shifted else ["corruptions=[]"])
    if reference is not None:    # the papers' metrics: k-NN consistency over train embeddings, T fitted on val
        args += [f"reference_dataset={reference}", f"reference_max_samples={reference_samples}"]
    fixed = fixed_logit_scale(run_dir)
    if fixed:
        args.append(f"logit_scale={fixed}")
    if (result.is_file() and stamp.is_file() and result.stat().st_mtime > model.stat().st_mtime
            and json.loads(stamp.read_text()) == args):
        print(f"eval: {run_dir.name} on {split} up to date, skipped", flush=True)
        return json.loads(result.read_text()), False
    print(f"\n--- evaluating {run_dir.name} on {dataset}:{split}", flush=True)
    evaluate_main(args)
    stamp.write_text(json.dumps(args))  # what the skip check above compares against
    return json.loads(result.read_text()), True


def tune(cfg: DemoConfig, out: Path, t0: float) -> Dict:
    """Learning-rate sweeps scored on the val split (zero-shot top-1); writes OUT/tune/tuning.json."""
    tune_out, seed = out / "tune", cfg.seeds[0]
    record: Dict = {"metric": "zero-shot top-1 on the val split", "split": "val", "seed": seed}
    log_stage(f"tune 1/2: CLIP pretraining, lr in {cfg.tune_pretrain_lr}", t0)
    runs = {lr: pretrain_runs(cfg, [seed], [f"optim.lr={lr}"], ("clip",), f"p_lr{lr:g}")[0]
            for lr in cfg.tune_pretrain_lr}
    train_all(list(runs.values()), tune_out, cfg.ranks)
    evals = {lr: evaluate_run(r.run_dir(tune_out), Path(cfg.data), "val", 0, cfg.eval_batch_size, False)[0]
             for lr, r in runs.items()}
    scores = {lr: e["zero_shot"]["top1"] for lr, e in evals.items()}
    record["val_samples"] = next(iter(evals.values()))["dataset"]["num_samples"]
    best_p = max(scores, key=scores.get)
    record["pretrain"] = [{"lr": lr, "val_top1": v} for lr, v in scores.items()]
    log_stage(f"tune 2/2: plain fine-tuning from lr={best_p:g}, lr in {cfg.tune_finetune_lr}", t0)
    runs = {lr: finetune_runs(cfg, tune_out, [seed], runs[best_p].name, [f"optim.lr={lr}"], ("plain",),
                              f"f_lr{lr:g}")[0] for lr in cfg.tune_finetune_lr}
    train_all(list(runs.values()), tune_out, cfg.ranks)
    scores_f = {lr: evaluate_run(r.run_dir(tune_out), Path(cfg.data), "val", 0, cfg.eval_batch_size, False)[0]
                ["zero_shot"]["top1"] for lr, r in runs.items()}
    best_f = max(scores_f, key=scores_f.get)
    record["finetune"] = [{"lr": lr, "val_top1": v} for lr, v in scores_f.items()]
    record["chosen"] = {"pretrain_lr": best_p, "finetune_lr": best_f}
    record["pretrain_overrides"], record["finetune_overrides"] = cfg.pretrain_overrides, cfg.finetune_overrides
    (tune_out / "tuning.json").write_text(json.dumps(record, indent=1))
    print(f"chosen on val: pretraining optim.lr={best_p:g}, fine-tuning optim.lr={best_f:g} "
          f"(written to {tune_out / 'tuning.json'})", flush=True)
    return record


def run_demo(cfg: DemoConfig, out: Path, profile: str, skip_shards: bool = False) -> Path:
    from train.experiments.demo import report as demo_report

    # Seconds per stage, from the last run in which the stage did work: a rerun that reuses finished
    # runs keeps the measured times instead of reporting the near-zero time of skipping them.
    t0, timings_file = time.perf_counter(), out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        did_work = fn(*args)
        if did_work:
            timings[name] = time.perf_counter() - t
        return did_work

    log_stage("1/5 shards: Fashion-MNIST -> URL list -> loopback HTTP -> img2dataset", t0)
    if not skip_shards:
        timed("shards", build_shards, cfg)
    pre = pretrain_runs(cfg, cfg.seeds)
    fine = finetune_runs(cfg, out, cfg.seeds)
    log_stage(f"2-3/5 training on {cfg.ranks} ranks: {len(pre)} pretrainings (CLIP, CyCLIP) then "
              f"{len(fine)} fine-tunings (plain, m²-Mix)", t0)
    timed("training", train_all, pre + fine, out, cfg.ranks)
    log_stage(f"4/5 evaluation of {len(pre) + len(fine)} models on {test_dir(cfg.data)} (test)", t0)
    timed("evaluation", lambda: sum(evaluate_run(run.run_dir(out), test_dir(cfg.data), "test", cfg.eval_max_samples,
                                                 cfg.eval_batch_size, True, cfg.data, cfg.eval_reference_samples)[1]
                                    for run in pre + fine))
    log_stage("5/5 report", t0)
    timings_file.write_text(json.dumps(timings, indent=1))
    report = demo_report.write_report(cfg, out, profile, pre, fine, timings)
    log_stage(f"done: {report}", t0)
    return report


def profile_config(args) -> tuple[DemoConfig, str]:
    profile = "fast" if args.fast else "full"
    path = args.config or DEMO_CONFIGS / f"{profile}.yaml"
    return load_config(DemoConfig, path, args.overrides), (Path(path).stem if args.config else profile)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        return worker(argv[1])
    parser = argparse.ArgumentParser(prog="python -m train.experiments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="configs/demo/fast.yaml: a few minutes, one seed")
    parser.add_argument("--config", default=None, help="a DemoConfig YAML instead of configs/demo/{full,fast}.yaml")
    parser.add_argument("--out", default=None, help="output folder: runs/, REPORT.md, plots/ (default demo, "
                        "or demo/fast with --fast)")
    parser.add_argument("--tune", action="store_true", help="learning-rate sweeps on the val split instead")
    parser.add_argument("--skip-shards", action="store_true", help="the dataset folders are built already")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of DemoConfig fields")
    args = parser.parse_args(argv)
    cfg, profile = profile_config(args)
    out = Path(args.out or ("demo/fast" if args.fast else "demo"))
    if args.tune:
        t0 = time.perf_counter()
        log_stage("shards", t0)
        build_shards(cfg)
        tune(cfg, out, t0)
        return 0
    run_demo(cfg, out, profile, args.skip_shards)
    return 0


if __name__ == "__main__":    # `python -m train.experiments.demo.run` as well as the package's __main__
    from common.cli import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:]))
