"""`make gpu-check`: the trainer on one GPU, in under 8 minutes, figures written into BENCHMARKS.md.

1. Resume: tiny_vit, bf16, NCCL at world size 1, 30 steps, checkpoints every 10. A second run is SIGKILLed
   (kill -9 from outside) as soon as its step-20 checkpoint is committed, so mid-way to step 30; it resumes
   from step 20 and must end within RESUME_RTOL of the uninterrupted run. (A kill in the middle of a save
   is the tests' fault injection, tests/harness/rank_launcher.py, which benchmarks do not import.)
2. Throughput: ViT-B-32 at 224 px, batch 256, bf16: this trainer against open_clip_train
   (--precision amp_bf16) on the same GPU and batch, with synthetic data (in memory for this trainer,
   open_clip_train's --dataset-type synthetic) and with real JPEGs (this trainer: its shards through its
   loader; open_clip_train: the same JPEGs as files through its CSV loader, see shards_for).
   MFU (model FLOPs counted with torch's FlopCounterMode over one forward + backward, against the GPU's
   dense bf16 peak) and peak GPU memory of this trainer's step.
3. Loss cost: CyCLIP and m2-Mix as % of a CLIP step at that batch (same engine, objective swapped, rounds
   alternated).

Without a CUDA GPU it exits with status 2 and one line saying so. ``--cpu-dry-run`` runs every part at toy
sizes on the CPU (gloo, ViT-S-32 at 64 px) and prints its section without writing it anywhere.
A GPU run writes its section (``bench_trainer_gpu``) into BENCHMARKS.md, the one results file
(benchmarks/run.py says why), and nowhere else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_trainer import bench_env, open_clip_train, ours, run_open_clip_train
from benchmarks.digits import make_digits_dataset
from common.net import free_port
from common.errors import EXIT_USER_ERROR
from train.launch.local import launch_ranks, log_tail, wait_ranks

ROOT = Path(__file__).resolve().parent.parent
SECTION = "bench_trainer_gpu"
"""This check's section of BENCHMARKS.md (benchmarks/run.py: sections are replaced by name)."""

RESUME_RTOL = 1e-2
"""Resumed vs uninterrupted, every loss term of steps 21-30: GPU kernels (atomics in some backward passes,
autotuned algorithms) are not bit-deterministic, so the resumed run may drift by bf16 rounding."""
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts; PCIe variants are lower)."""


def sizes(dry: bool) -> dict:
    if dry:
        return dict(model="ViT-S-32", image=64, batch=8, steps=6, tiny_steps=6, tiny_every=2, workers=1,
                    rounds=2, device="cpu", threads=2)
    return dict(model="ViT-B-32", image=224, batch=256, steps=30, tiny_steps=30, tiny_every=10, workers=8,
                rounds=3, device="cuda", threads=8)


def check_gpu(dry: bool) -> str:
    if dry:
        return "none (--cpu-dry-run: CPU, toy sizes)"
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine with "
              "one GPU, or `python -m benchmarks.gpu_check --cpu-dry-run` to exercise it on the CPU", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    return torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------------------------ 1. resume
def _train(args: list[str], log_dir: Path, name: str, threads: int, kill_after: str | None = None) -> int:
    """``python -m train ARGS`` as rank 0 of 1 (train.launch.local); its exit code. With ``kill_after`` (a
    checkpoint tag), SIGKILL it from outside as soon as ``checkpoints/latest`` names that tag."""
    run_dir = Path(next(a for a in args if a.startswith("run.run_dir=")).split("=", 1)[1])
    (proc,) = launch_ranks(log_dir, name, 1, args, threads=threads, extra_env=bench_env())
    if kill_after is not None:
        latest = run_dir / "checkpoints" / "latest"
        while proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() == kill_after:
                proc.kill()
                break
            time.sleep(0.005)
    return wait_ranks([proc])[0]


def resume_check(tmp: Path, data: Path, s: dict) -> dict:
    """Uninterrupted vs killed-and-resumed tiny_vit bf16 runs; max relative difference of the last steps."""
    from common.jobs import resume_overrides

    base = ["--config", str(ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={data}", "zero.precision=bf16",
            "data.global_batch_size=64", f"optim.steps={s['tiny_steps']}", "optim.warmup_steps=2",
            f"checkpoint.every_steps={s['tiny_every']}", "logging.progress_bar=false", "logging.tensorboard=false"]
    resume_tag = f"step_{s['tiny_steps'] - s['tiny_every']:08d}"
    runs = {}
    for name in ("uninterrupted", "resumed"):
        run_dir = tmp / f"tiny_{name}"
        args = resume_overrides(base + [f"run.run_dir={run_dir}"], restarted=True)
        if name == "resumed":
            code = _train(args, tmp, name, s["threads"], kill_after=resume_tag)
            latest = (run_dir / "checkpoints" / "latest").read_text().strip()
            if code != -9 or latest != resume_tag:
                raise RuntimeError(f"the run to kill exited with {code} and its latest checkpoint is {latest}, not "
                                   f"SIGKILL after {resume_tag}; see {tmp / (name + '.rank0.log')}")
        code = _train(args, tmp, name, s["threads"])
        if code != 0:
            raise RuntimeError(f"tiny {name} run exited with {code}: {log_tail(tmp, name)}")
        runs[name] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    a, b = runs["uninterrupted"], runs["resumed"]
    if not [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, s["tiny_steps"] + 1)):
        raise RuntimeError("the resumed run's steps do not line up with the uninterrupted run's")
    tail = range(s["tiny_steps"] - s["tiny_every"], s["tiny_steps"])
    worst = max(abs(b[i][t] - a[i][t]) / max(abs(a[i][t]), 1e-6) for i in tail for t in ("loss", "clip"))
    return {"final_loss": a[-1]["loss"], "resumed_final_loss": b[-1]["loss"], "max_rel_diff": worst,
            "ok": worst <= RESUME_RTOL and all(math.isfinite(r["loss"]) for r in a + b)}


# ------------------------------------------------------------------------------------------ 2. throughput
def shards_for(tmp: Path, s: dict) -> tuple[Path, Path]:
    """Real JPEG shards (scikit-learn digits, upscaled) in this project's format, and the same JPEGs as files
    with a CSV for open_clip_train: its webdataset reader expects the `fname` field of webdataset <= 0.2.86
    (KeyError: 'fname' with the 0.2.111 this project pins), its CSV reader works with any."""
    import tarfile

    per_shard = 256 if s["batch"] >= 256 else 32
    data = make_digits_dataset(tmp / "shards", n_train=min(1536, per_shard * 6), n_val=16, shard_size=per_shard,
                               image_size=s["image"])
    files, rows = tmp / "jpgs", []
    files.mkdir()
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    key = name[:-4]
                    (files / name).write_bytes(tar.extractfile(member).read())
                    caption = tar.extractfile(members[key + ".txt"]).read().decode().replace("\t", " ")
                    rows.append(f"{files / name}\t{caption}")
    csv = tmp / "train.csv"  # repeated so that one epoch is exactly the benchmark's steps
    csv.write_text("filepath\ttitle\n" + "\n".join(rows[i % len(rows)] for i in range(s["batch"] * s["steps"])) + "\n")
    return data, csv


def open_clip_real(log_dir: Path, csv: Path, s: dict) -> float:
    """open_clip_train on the same JPEGs (CSV dataset): the synthetic-data call with --train-data instead."""

    args = [sys.executable, "-m", "open_clip_train.main", "--model", s["model"], "--force-image-size", str(s["image"]),
            "--train-data", str(csv), "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key",
            "title", "--batch-size", str(s["batch"]),
            "--precision", "amp_bf16", "--device", s["device"], "--epochs", "1", "--workers", str(s["workers"]),
            "--log-every-n-steps", "1", "--logs", str(log_dir), "--name", "real", "--save-frequency", "0",
            "--report-to", "", "--warmup", "2", "--lr", "5e-4", "--grad-clip-norm", "1.0"]
    return run_open_clip_train(args, log_dir, s["threads"], "open_clip_train (JPEG files)")


def throughput(tmp: Path, data: Path, csv: Path, s: dict) -> dict:
    oc_precision = "amp_bf16"
    (tmp / "oc_syn").mkdir()
    (tmp / "oc_real").mkdir()
    return {
        "open_clip_train synthetic": open_clip_train(tmp / "oc_syn", s["model"], s["image"], s["batch"], s["steps"],
                                                     s["threads"], device=s["device"], precision=oc_precision,
                                                     workers=s["workers"]),
        "this trainer, real shards": ours(data, tmp / "ours_real", s["model"], s["image"], s["batch"], s["steps"],
                                          world=1, threads=s["threads"], precision="bf16", workers=s["workers"]),
        "open_clip_train, real shards": open_clip_real(tmp / "oc_real", csv, s),
    }


# ------------------------------------------------------------------------------------------ 3. in process
def in_process(tmp: Path, data: Path, s: dict) -> dict:
    """One engine at the benchmark size: synthetic-data rate, peak memory, MFU, loss costs."""
    from common.config_loader import load_config
    from train.config import TrainConfig
    from train.losses.objective import ContrastiveObjective
    from train.core.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cfg = load_config(TrainConfig, str(ROOT / "configs" / "pretrain_clip.yaml"), [
        f"data.path={data}", f"run.run_dir={tmp / 'inproc'}", f"model.name={s['model']}",
        f"model.force_image_size={s['image']}", f"data.global_batch_size={s['batch']}", "data.num_workers=0",
        "optim.steps=100000", "zero.precision=bf16", "checkpoint.export=false", "logging.progress_bar=false",
        "logging.tensorboard=false"])
    trainer = Trainer(cfg)
    trainer.engine.train()
    device = trainer.device
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(s["batch"], 3, s["image"], s["image"], generator=gen),
             "text": torch.randint(1, 49407, (s["batch"], trainer.tokenizer.context_length), generator=gen)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def rate(steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        sync()
        return steps * s["batch"] / (time.perf_counter() - t0)

    rate(2)  # warm-up: allocator, autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synthetic = rate(max(3, s["steps"] // 3))
    peak_gib = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                else _max_rss_gib())
    flops = flops_per_sample(cfg, device, batch)
    clip_cfg = dataclasses.replace(cfg.loss, cyclip_in_modal=0.0, cyclip_cross_modal=0.0, m2mix_weight=0.0)
    variants = {"CLIP": clip_cfg,
                "CyCLIP": dataclasses.replace(clip_cfg, cyclip_in_modal=0.25, cyclip_cross_modal=0.25),
                "m2-Mix": dataclasses.replace(clip_cfg, m2mix_weight=0.02)}
    times = {name: [] for name in variants}
    for _ in range(s["rounds"]):  # alternated, so drift hits every variant alike
        for name, loss_cfg in variants.items():
            trainer.cfg.loss, trainer.objective = loss_cfg, ContrastiveObjective(loss_cfg, cfg.run.seed)
            trainer.train_step(batch)
            times[name].append(s["batch"] / rate(max(2, s["steps"] // 6)))
    step_s = {name: statistics.median(v) for name, v in times.items()}
    trainer.close()
    return {"synthetic": synthetic, "peak_gib": peak_gib, "flops_per_sample": flops,
            "cost_pct": {n: 100 * (step_s[n] - step_s["CLIP"]) / step_s["CLIP"] for n in ("CyCLIP", "m2-Mix")},
            "step_s": step_s}


def flops_per_sample(cfg, device: torch.device, batch: dict) -> float:
    """Model FLOPs of one sample's forward + backward (matmuls/convs as torch counts them), on a separate
    copy of the model (the engine's gradient hooks stay untouched); 2 samples measured."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.model.build import build_model

    model = build_model(cfg.model, device)[0].train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        image_features, text_features = model(batch["image"][:2].to(device), batch["text"][:2].to(device))[:2]
        (image_features.float().sum() + text_features.float().sum()).backward()
    del model
    return counter.get_total_flops() / 2


def _max_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_tflops(gpu: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in gpu.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


# ------------------------------------------------------------------------------------------ report
def report(gpu: str, s: dict, resume: dict, rates: dict, inproc: dict, elapsed: float, peak: float | None) -> str:
    ratio = lambda a, b: f"{a / b:.2f}x"
    mfu = (f"{100 * inproc['synthetic'] * inproc['flops_per_sample'] / (peak * 1e12):.1f}%" if peak
           else "n/a (no bf16 peak known for this device; see PEAK_BF16_TFLOPS)")
    syn_ref, real_ref = rates["open_clip_train synthetic"], rates["open_clip_train, real shards"]
    lines = [
        "## GPU check (`make gpu-check`)", "",
        f"GPU: **{gpu}**. {s['model']} at {s['image']} px, batch {s['batch']}, bf16 (this trainer: "
        f"zero.precision=bf16, zero.bf16_mode=autocast, ZeRO-1, world size 1 over "
        f"{'NCCL' if s['device'] == 'cuda' else 'gloo'}; open_clip_train: "
        f"--precision amp_bf16), gradient clipping 1.0 in both. Whole check: {elapsed:.0f} s.", "",
        "| trainer | data | samples/s | ratio vs open_clip_train |", "|---|---|---|---|",
        f"| open_clip_train | synthetic | {syn_ref:.1f} | 1.00x |",
        f"| this trainer | synthetic (in memory, same step) | {inproc['synthetic']:.1f} | "
        f"**{ratio(inproc['synthetic'], syn_ref)}** |",
        f"| open_clip_train | the same JPEGs, as files + CSV ({s['workers']} workers) | {real_ref:.1f} | 1.00x |",
        f"| this trainer | real JPEG shards ({s['workers']} workers) | {rates['this trainer, real shards']:.1f} | "
        f"**{ratio(rates['this trainer, real shards'], real_ref)}** |", "",
        f"MFU of this trainer's synthetic-data step: {mfu} ({inproc['flops_per_sample'] / 1e9:.1f} GFLOP per sample "
        f"forward + backward{f', {peak:.0f} TFLOP/s dense bf16 peak' if peak else ''}). Peak memory of its "
        f"step: {inproc['peak_gib']:.1f} GiB.", "",
        "| loss | step time (s) | cost vs a CLIP step |", "|---|---|---|"]
    for name, step in inproc["step_s"].items():
        cost = "-" if name == "CLIP" else f"{inproc['cost_pct'][name]:+.1f}%"
        lines.append(f"| {name} | {step:.4f} | {cost} |")
    backend, resumed_at = "NCCL" if s["device"] == "cuda" else "gloo", s["tiny_steps"] - s["tiny_every"]
    lines += ["", f"Resume (tiny_vit, bf16, {backend}, world size 1, {s['tiny_steps']} steps, checkpoint every "
              f"{s['tiny_every']}, SIGKILL once the step-{resumed_at} checkpoint was committed, resumed from step "
              f"{resumed_at}): final loss {resume['final_loss']:.5f} uninterrupted, "
              f"{resume['resumed_final_loss']:.5f} resumed; largest relative difference over the resumed steps "
              f"{resume['max_rel_diff']:.2e} (tolerance {RESUME_RTOL:g}): **{'pass' if resume['ok'] else 'FAIL'}**."]
    return "\n".join(lines) + "\n"


def write_benchmarks(section: str) -> Path:
    """The section into BENCHMARKS.md (replacing this check's earlier one; the other sections stay)."""
    from benchmarks.run import RESULTS, write_section

    return write_section(RESULTS, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU; prints, writes nothing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    args = parser.parse_args(argv)
    gpu = check_gpu(args.cpu_dry_run)
    s = sizes(args.cpu_dry_run)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_data = make_digits_dataset(tmp / "digits32", n_train=640, n_val=16, shard_size=128)
        print("gpu-check: 1/3 resume", flush=True)
        resume = resume_check(tmp, tiny_data, s)
        print(f"gpu-check: {resume}", flush=True)
        data, csv = shards_for(tmp, s)
        print("gpu-check: 2/3 throughput", flush=True)
        rates = throughput(tmp, data, csv, s)
        print(f"gpu-check: {rates}", flush=True)
        print("gpu-check: 3/3 synthetic step, MFU, memory, loss costs", flush=True)
        inproc = in_process(tmp, data, s)
    section = report(gpu, s, resume, rates, inproc, time.perf_counter() - t0,
                     args.peak_tflops or (None if args.cpu_dry_run else peak_tflops(gpu)))
    print(section)
    if not args.cpu_dry_run:
        print(f"gpu-check: wrote {write_benchmarks(section)}")
    return 0 if resume["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
