"""Trainer throughput against open_clip's own trainer, same model, image size, batch and precision.

open_clip_train only knows built-in model names and cannot run 2 ranks on CPU (its DDP wrapper passes
device_ids), so the side-by-side ratio is at 1 process with 2 threads; this trainer's 2-rank figure
is reported beside it. Both read images through their own data path (ours: JPEG shards through wids
with per-sample seeded augmentation; open_clip_train: its synthetic dataset, one PIL image re-transformed).
On a GPU (when one is present) the same comparison runs on ViT-B-32 and ViT-B-16 in bf16.
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(data: Path, run_dir: Path, model: str, image_size: int, batch: int, steps: int, world: int,
         threads: int, stage: int = 1, precision: str = "fp32", workers: int = 1) -> float:
    """Median samples/s of this trainer over the steps after the first third (startup excluded)."""
    args = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "pretrain_clip.yaml"),
            f"data.path={data}", f"run.run_dir={run_dir}", f"model.name={model}", f"model.force_image_size={image_size}",
            f"data.global_batch_size={batch * world}", f"data.num_workers={workers}", f"optim.steps={steps}",
            "checkpoint.every_steps=100000", "checkpoint.export=false", "logging.progress_bar=false",
            "logging.tensorboard=false", f"zero.stage={stage}", f"zero.precision={precision}"]
    env = dict(_env(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"trainer failed: {err[-3000:]}")
    rates = [json.loads(l)["samples_per_s"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[len(rates) // 3:])


def open_clip_train(log_dir: Path, model: str, image_size: int, batch: int, steps: int, threads: int,
                    device: str = "cpu", precision: str = "fp32", workers: int = 1) -> float:
    """Median per-step samples/s that open_clip_train logs, first third excluded."""
    args = [sys.executable, "-m", "open_clip_train.main", "--model", model, "--force-image-size", str(image_size),
            "--dataset-type", "synthetic", "--train-num-samples", str(batch * steps), "--batch-size", str(batch),
            "--precision", precision, "--device", device, "--epochs", "1", "--workers", str(workers),
            "--log-every-n-steps", "1", "--logs", str(log_dir), "--name", "bench", "--save-frequency", "0",
            "--report-to", "", "--warmup", "2", "--lr", "5e-4"]
    out = subprocess.run(args, cwd=log_dir, env=_env(threads), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"open_clip_train failed: {out.stderr[-3000:]}")
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,", out.stdout + out.stderr)]
    if not rates:
        raise RuntimeError("no throughput lines in open_clip_train's output")
    return statistics.median(rates[len(rates) // 3:])


def run(quick: bool) -> str:
    from tests.data_fixtures import make_digits_dataset

    model, image_size, batch = "ViT-S-32", 64, 32
    steps = 12 if quick else 30
    lines = ["## Trainer throughput vs open_clip_train", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits_dataset(tmp / "digits", n_train=batch * 2 * 8, n_val=16, shard_size=128,
                                   image_size=image_size)
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        # The reference runs before and after ours and its mean is the denominator, so a slow drift of
        # the machine's speed during the bench does not land on one side of the ratio.
        (tmp / "ref_a").mkdir(), (tmp / "ref_b").mkdir()
        reference_a = open_clip_train(tmp / "ref_a", model, image_size, batch, steps, threads=2)
        ours_by_stage = {stage: ours(data, tmp / f"ours_zero{stage}", model, image_size, batch, steps, world=1,
                                     threads=2, stage=stage) for stage in (1, 0, 2)}
        reference_b = open_clip_train(tmp / "ref_b", model, image_size, batch, steps, threads=2)
        ours_2 = ours(data, tmp / "ours2", model, image_size, batch, steps, world=2, threads=1)
        elapsed = time.perf_counter() - t0
    reference = (reference_a + reference_b) / 2
    lines += [f"CPU, {model} at {image_size} px, fp32, batch {batch} per process, {steps} steps, median "
              "samples/s over the last two thirds (startup excluded). open_clip_train ran before and after "
              "this trainer; the ratio is against the mean of its two runs. This trainer uses torch's fused "
              "AdamW (`optim.fused_adamw`, the default).", "",
              "| trainer | processes x threads | global batch | samples/s | ratio vs open_clip_train |",
              "|---|---|---|---|---|",
              f"| open_clip_train (synthetic data), mean of 2 runs ({reference_a:.1f}, {reference_b:.1f}) | 1 x 2 | "
              f"{batch} | {reference:.1f} | 1.00x |"]
    for stage, rate in ours_by_stage.items():
        lines.append(f"| this trainer (ZeRO-{stage}, JPEG shards) | 1 x 2 | {batch} | {rate:.1f} | "
                     f"{rate / reference:.2f}x |")
    lines += [f"| this trainer (ZeRO-1, JPEG shards, 2 ranks over gloo) | 2 x 1 | {2 * batch} | {ours_2:.1f} | "
              f"{ours_2 / reference:.2f}x |", "",
              "open_clip_train cannot run 2 ranks on CPU (its DDP wrapper passes device_ids), so the 2-rank row "
              "has no side-by-side counterpart. Target: >= 1.0x at 1 process. The forward and backward are the "
              "same open_clip model code in both; what remains between the rows is DeepSpeed's per-step "
              "gradient handling, which it does even at world size 1 (stage 0: flatten + all-reduce of all "
              "gradients; stages 1-2: flatten into the partition + a per-tensor norm for clipping). Total bench "
              f"time {elapsed:.0f} s; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              "(above 2 = other processes shared the 2 cores, so absolute numbers are low and the ratio is noisy)."]
    return "\n".join(lines) + "\n"
