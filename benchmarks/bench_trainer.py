"""Trainer throughput against open_clip's own trainer, same model, image size, batch and precision.

open_clip_train only knows built-in model names and cannot run 2 ranks on CPU (its DDP wrapper passes
device_ids), so the side-by-side ratio is at 1 process with 2 threads. Single runs of this trainer with the
allocator cache off and in both bf16 modes are reported beside it. Both read images through their own data path (ours: JPEG shards through wids
with per-sample seeded augmentation; open_clip_train: its synthetic dataset, one PIL image re-transformed).
The GPU comparison (ViT-B-32, bf16, against --precision amp_bf16) is benchmarks/gpu_check.py (`make gpu-check`).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.launch.local import launch_ranks, log_tail, pythonpath, wait_ranks

ROOT = Path(__file__).resolve().parent.parent


def bench_env() -> dict:
    """What every trainer and open_clip_train process of the benchmarks gets on top of os.environ (PYTHONPATH is
    launch_ranks' and _env's: the repository prepended, an existing one kept)."""
    return dict(NO_ALBUMENTATIONS_UPDATE="1",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def _env(threads: int) -> dict:
    """open_clip_train's environment: this repository's (prepended to PYTHONPATH, which stays), with ``threads``
    OpenMP threads."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=pythonpath(ROOT), **bench_env())


def ours(data: Path, run_dir: Path, model: str, image_size: int, batch: int, steps: int, world: int,
         threads: int, stage: int = 1, precision: str = "fp32", workers: int = 1, extra: tuple = ()) -> float:
    """Median samples/s of this trainer over the steps after the first third (startup excluded)."""
    args = ["--config", str(ROOT / "configs" / "pretrain_clip.yaml"),
            f"data.path={data}", f"run.run_dir={run_dir}", f"model.name={model}", f"model.force_image_size={image_size}",
            f"data.global_batch_size={batch * world}", f"data.num_workers={workers}", f"optim.steps={steps}",
            "checkpoint.every_steps=100000", "checkpoint.export=false", "logging.progress_bar=false",
            "logging.tensorboard=false", f"zero.stage={stage}", f"zero.precision={precision}", *extra]
    logs = run_dir.parent    # RUN_DIR.rank{R}.log beside the run folder, which the trainer makes itself
    procs = launch_ranks(logs, run_dir.name, world, args, threads=threads, extra_env=bench_env())
    for rank, code in enumerate(wait_ranks(procs)):
        if code != 0:
            raise RuntimeError(f"trainer rank {rank} exited with {code}: {log_tail(logs, run_dir.name, rank)}")
    rates = [json.loads(l)["samples_per_s"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[len(rates) // 3:])


def open_clip_train(log_dir: Path, model: str, image_size: int, batch: int, steps: int, threads: int,
                    device: str = "cpu", precision: str = "fp32", workers: int = 1,
                    timeout: float | None = None) -> float:
    """Median per-step samples/s that open_clip_train logs, first third excluded (``timeout``: seconds, then
    killed)."""
    args = [sys.executable, "-m", "open_clip_train.main", "--model", model, "--force-image-size", str(image_size),
            "--dataset-type", "synthetic", "--train-num-samples", str(batch * steps), "--batch-size", str(batch),
            "--precision", precision, "--device", device, "--epochs", "1", "--workers", str(workers),
            "--log-every-n-steps", "1", "--logs", str(log_dir), "--name", "bench", "--save-frequency", "0",
            "--report-to", "", "--warmup", "2", "--lr", "5e-4",
            # the same work per step as this trainer's configs, which clip at optim.grad_clip = 1.0
            "--grad-clip-norm", "1.0"]
    return run_open_clip_train(args, log_dir, threads, "open_clip_train", timeout)


def run_open_clip_train(args: list, log_dir: Path, threads: int, what: str, timeout: float | None = None) -> float:
    """Run an open_clip_train command; its median samples/s over the last two thirds of its log lines. With
    ``timeout`` (seconds) it is killed then and subprocess.TimeoutExpired raised."""
    out = subprocess.run(args, cwd=log_dir, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stderr[-3000:]}")
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,", out.stdout + out.stderr)]
    if not rates:
        raise RuntimeError(f"no throughput lines in {what}'s output")
    return statistics.median(rates[len(rates) // 3:])


def run(quick: bool) -> str:
    from benchmarks.digits import make_digits_dataset

    model, image_size, batch = "ViT-S-32", 64, 32
    steps, pairs = (12, 2) if quick else (16, 3)
    lines = ["## Trainer throughput vs open_clip_train", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits_dataset(tmp / "digits", n_train=batch * 2 * 8, n_val=16, shard_size=128,
                                   image_size=image_size)
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        # Paired and alternating (ref, ours, ref, ours, ...): these machines drift by 20% within minutes,
        # so each ratio compares two neighbouring runs and the table reports the median ratio.
        reference, zero1 = [], []
        for pair in range(pairs):
            (tmp / f"ref_{pair}").mkdir()
            reference.append(open_clip_train(tmp / f"ref_{pair}", model, image_size, batch, steps, threads=2))
            zero1.append(ours(data, tmp / f"ours_zero1_{pair}", model, image_size, batch, steps, world=1,
                              threads=2, stage=1))
        variants = {  # row label -> ours() keyword arguments
            "ZeRO-1, glibc allocator defaults (`run.cpu_allocator_cache=false`)":
                dict(extra=("run.cpu_allocator_cache=false",)),
            "ZeRO-1, bf16 weights (`zero.precision=bf16`)": dict(precision="bf16"),
            "ZeRO-1, bf16 autocast (`zero.precision=bf16 zero.bf16_mode=autocast`)":
                dict(precision="bf16", extra=("zero.bf16_mode=autocast",)),
        }
        if quick:  # the allocator row only: it is the one that explains the ZeRO-1 ratio
            variants = dict(list(variants.items())[:1])
        others = {label: ours(data, tmp / f"ours_v{i}", model, image_size, batch, steps, world=1, threads=2, **kw)
                  for i, (label, kw) in enumerate(variants.items())}
        elapsed = time.perf_counter() - t0
    return "\n".join(lines + _table(model, image_size, batch, steps, reference, zero1, others, elapsed,
                                    load_before)) + "\n"


def _table(model: str, image_size: int, batch: int, steps: int, reference: list, zero1: list, others: dict,
           elapsed: float, load_before: float) -> list:
    pairs = len(reference)
    lines = []
    ratios = [z / r for z, r in zip(zero1, reference)]
    ref_median = statistics.median(reference)
    fmt = lambda values: ", ".join(f"{v:.1f}" for v in values)
    lines += [f"CPU, {model} at {image_size} px, fp32, batch {batch} per process, gradient clipping 1.0 in both, "
              f"{steps} steps, median samples/s over the last two thirds (startup excluded). open_clip_train and "
              f"this trainer (ZeRO-1) ran as {pairs} alternating pair(s); the ZeRO-1 ratio is the median of the "
              "per-pair ratios. The other rows ran once after the pairs and are divided by the median "
              "open_clip_train rate (less reliable). This trainer uses torch's fused AdamW (`optim.fused_adamw`, "
              "the default); open_clip_train its default unfused AdamW.", "",
              "| trainer | processes x threads | global batch | samples/s | ratio vs open_clip_train |",
              "|---|---|---|---|---|",
              f"| open_clip_train (synthetic data), runs: {fmt(reference)} | 1 x 2 | {batch} | {ref_median:.1f} | 1.00x |",
              f"| this trainer (ZeRO-1, JPEG shards), runs: {fmt(zero1)}; per-pair ratios: "
              f"{', '.join(f'{r:.2f}' for r in ratios)} | 1 x 2 | {batch} | {statistics.median(zero1):.1f} | "
              f"**{statistics.median(ratios):.2f}x** |"]
    for label, rate in others.items():
        lines.append(f"| this trainer ({label}, JPEG shards) | 1 x 2 | {batch} | {rate:.1f} | "
                     f"{rate / ref_median:.2f}x |")
    lines += ["", "open_clip_train cannot run 2 ranks on CPU (its DDP wrapper passes device_ids), so there is no "
              "2-rank comparison. Target: >= 1.0x at 1 process. The forward and backward are the "
              "same open_clip model code in both; what differs is the step: DeepSpeed's gradient handling, which "
              "it does even at world size 1 (stage 0: flatten + all-reduce of all gradients; stages 1-2: flatten "
              "into the partition + a per-tensor fp64 norm), against open_clip_train's unfused AdamW. Profiled at "
              "ZeRO-1 and 1 rank, most of that extra step time was page faults: each step allocates ~240 MB of "
              "fresh gradient, flatten and norm buffers, which glibc maps and unmaps again every time. The trainer "
              "keeps freed memory in the heap on CPU (`run.cpu_allocator_cache`, mallopt), which the "
              "'glibc allocator defaults' row switches off. The full run (without --quick) adds one row per bf16 "
              "mode (CPU with AMX here). Total bench "
              f"time {elapsed:.0f} s; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              "(above 2 = other processes shared the 2 cores, so absolute numbers are low and the ratio is noisy)."]
    return lines
