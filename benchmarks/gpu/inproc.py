"""The in-process parts: this trainer's step against an open_clip_train step, MFU and memory, loss costs.

One process holds this trainer (a Trainer: DeepSpeed ZeRO-1 at world size 1, zero.precision=bf16, autocast) and
``OpenClipTrainStep``, what open_clip_train's train_one_epoch does for one batch (--precision amp_bf16,
--grad-clip-norm 1.0). Both take the same pinned CPU batches (synthetic: random images and tokens) to the GPU
every step and run in alternating windows of ``window`` steps, so drift hits both alike. Samples/s are
``window * batch / seconds`` of a window, CUDA synchronised at both ends. Nothing is checkpointed here.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu.parts import ROOT, Budget, check_env
from common.net import free_port


class OpenClipTrainStep:
    """open_clip_train's step (open_clip_train/train.py, train_one_epoch, accum_freq 1): fp32 weights, autocast
    bf16 forward, ``open_clip.loss.ClipLoss``, backward, ``clip_grad_norm_`` (1.0), torch AdamW with its
    parameter groups (no weight decay on gains, biases, logit_scale), logit_scale clamped to log(100)."""

    def __init__(self, model: str, image: int, device: torch.device, lr: float = 5e-4, wd: float = 0.2):
        import open_clip
        from open_clip.loss import ClipLoss

        torch.manual_seed(0)
        self.device = device
        self.model = open_clip.create_model(model, force_image_size=image, device=device, output_dict=True).train()
        named = list(self.model.named_parameters())
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        self.opt = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": wd}],
            lr=lr, betas=(0.9, 0.98), eps=1e-6)
        self.loss = ClipLoss()

    def __call__(self, batch: dict) -> float:
        """One step on ``batch`` ({"image": N x 3 x H x W, "text": N x L}, on the CPU); returns nothing useful
        to the timing (the loss stays on the GPU)."""
        images = batch["image"].to(self.device, non_blocking=True)
        texts = batch["text"].to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.model(images, texts)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, norm_type=2.0)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))


class Bench:
    """The trainer, the baseline and the batches the in-process parts share (built by the first of them)."""

    def __init__(self, tmp: Path, data: Path, s: dict):
        from train.core.trainer import Trainer

        check_env()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        self.s = s
        self.cfg = bench_config(tmp, data, s)
        self.trainer = Trainer(self.cfg)
        self.trainer.engine.train()
        self.device = self.trainer.device
        self.cuda = self.device.type == "cuda"
        gen = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(2):   # two, used in turn, so no step sees the inputs of the step before
            b = {"image": torch.randn(s["batch"], 3, s["image"], s["image"], generator=gen),
                 "text": torch.randint(1, 49407, (s["batch"], self.trainer.tokenizer.context_length), generator=gen)}
            self.batches.append({k: v.pin_memory() for k, v in b.items()} if self.cuda else b)
        self.baseline = OpenClipTrainStep(s["model"], s["image"], self.device)

    def sync(self) -> None:
        """Wait for the GPU (nothing on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize()

    def window(self, step, steps: int) -> float:
        """Samples/s of ``steps`` calls of ``step(batch)``."""
        self.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            step(self.batches[i % 2])
        self.sync()
        return steps * self.s["batch"] / (time.perf_counter() - t0)

    def close(self) -> None:
        """Close the trainer (loader, writers)."""
        self.trainer.close()


def bench_data(tmp: Path, s: dict) -> Path:
    """The shards the in-process trainer is built on (its steps take the synthetic batches): enough samples for
    one global batch of ``s["batch"]``, or the trainer's data order refuses to start."""
    from benchmarks.digits import make_digits_dataset

    return make_digits_dataset(tmp / "shards_inproc", n_train=max(64, s["batch"]), n_val=16, shard_size=32,
                               image_size=s["image"])


def bench_config(tmp: Path, data: Path, s: dict):
    """The in-process trainer's TrainConfig: ZeRO-1, world size 1, bf16 autocast, nothing saved."""
    from common.config_loader import load_config
    from train.config import TrainConfig

    return load_config(TrainConfig, str(ROOT / "configs" / "pretrain_clip.yaml"), [
        f"data.path={data}", f"run.run_dir={tmp / 'inproc'}", f"model.name={s['model']}",
        f"model.force_image_size={s['image']}", f"data.global_batch_size={s['batch']}", "data.num_workers=0",
        "optim.steps=1000000", "checkpoint.every_steps=1000000", "zero.precision=bf16",
        "zero.bf16_mode=autocast", "checkpoint.export=false", "logging.progress_bar=false",
        "logging.tensorboard=false"])


def throughput(bench_box: list, tmp: Path, data: Path, s: dict, budget: Budget) -> dict:
    """Part 1: alternating windows of this trainer's step and OpenClipTrainStep; median samples/s of each and
    the median of the per-round ratios. Builds the shared Bench into ``bench_box``."""
    t0 = time.perf_counter()
    bench = Bench(tmp, data, s)
    bench_box.append(bench)
    startup = time.perf_counter() - t0
    ours = bench.trainer.train_step
    for step in (ours, bench.baseline):
        bench.window(step, s["warmup"])        # allocator, cuDNN/cuBLAS autotuning, DeepSpeed's first step
    rates = {"open_clip_train step": [], "this trainer": []}
    round_s = 0.0
    for r in range(s["rounds"]):
        if r and budget.left() < 1.5 * round_s:
            break                              # another round would not fit: keep the rounds done
        t_round = time.perf_counter()
        order = [("open_clip_train step", bench.baseline), ("this trainer", ours)]
        for name, step in (order if r % 2 == 0 else order[::-1]):
            rates[name].append(bench.window(step, s["window"]))
        round_s = time.perf_counter() - t_round
    ratios = [o / b for o, b in zip(rates["this trainer"], rates["open_clip_train step"])]
    return {"samples_per_s": {k: statistics.median(v) for k, v in rates.items()}, "windows": rates,
            "ratio": statistics.median(ratios), "rounds": len(ratios), "window_steps": s["window"],
            "startup_s": round(startup, 1)}


def mfu_memory(bench_box: list, rate: float | None, gpu: str, peak: float | None, budget: Budget) -> dict:
    """Part 2: model FLOPs per sample (torch's FlopCounterMode over one forward + backward of a separate model
    copy), MFU of this trainer's rate against the dense bf16 peak (TFLOP/s), and the peak GPU memory (GiB) of a
    window of its steps with the baseline freed first."""
    bench = bench_box[0]
    bench.baseline = None
    free_memory(bench.cuda, reset_peak=True)
    window = bench.window(bench.trainer.train_step, bench.s["window"])
    budget.check("the memory window")
    peak_gib = peak_memory_gib(bench.cuda)
    flops = flops_per_sample(bench.cfg, bench.device, bench.batches[0])
    rate = rate or window
    mfu = rate * flops / (peak * 1e12) if peak else None
    return {"flops_per_sample": flops, "samples_per_s": rate, "peak_tflops": peak, "mfu": mfu,
            "peak_gib": peak_gib, "memory": "max_memory_allocated" if bench.cuda else "max RSS (CPU)"}


def flops_per_sample(cfg, device: torch.device, batch: dict) -> float:
    """Model FLOPs of one sample's forward + backward (matmuls/convs as torch counts them), on a separate copy of
    the model (the engine's gradient hooks stay untouched); 2 samples measured."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.model.build import build_model

    model = build_model(cfg.model, device)[0].train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        image_features, text_features = model(batch["image"][:2].to(device), batch["text"][:2].to(device))[:2]
        (image_features.float().sum() + text_features.float().sum()).backward()
    del model
    return counter.get_total_flops() / 2


def loss_costs(bench_box: list, budget: Budget) -> dict:
    """Part 3: CyCLIP and m2-Mix step time as % over a CLIP step (same engine, objective swapped), in rounds of
    alternating windows; the median step time (s) of each."""
    from train.losses.objective import ContrastiveObjective

    bench = bench_box[0]
    trainer, cfg, s = bench.trainer, bench.cfg, bench.s
    clip_cfg = dataclasses.replace(cfg.loss, cyclip_in_modal=0.0, cyclip_cross_modal=0.0, m2mix_weight=0.0)
    variants = {"CLIP": clip_cfg,
                "CyCLIP": dataclasses.replace(clip_cfg, cyclip_in_modal=0.25, cyclip_cross_modal=0.25),
                "m2-Mix": dataclasses.replace(clip_cfg, m2mix_weight=0.02)}
    times = {name: [] for name in variants}
    round_s = 0.0
    for r in range(s["rounds"]):
        if r and budget.left() < 1.5 * round_s:
            break                              # another round would not fit: keep the rounds done
        t_round = time.perf_counter()
        for name, loss_cfg in variants.items():
            use(trainer, loss_cfg, ContrastiveObjective(loss_cfg, cfg.run.seed, equal_rows=True))
            trainer.train_step(bench.batches[0])     # a new objective's first step (m2-Mix: its mixing buffers)
            times[name].append(s["batch"] / bench.window(trainer.train_step, s["window"]))
        round_s = time.perf_counter() - t_round
    step_s = {name: statistics.median(v) for name, v in times.items()}
    use(trainer, clip_cfg, ContrastiveObjective(clip_cfg, cfg.run.seed, equal_rows=True))
    return {"step_s": step_s, "rounds": len(times["CLIP"]), "window_steps": s["window"],
            "cost_pct": {n: 100 * (step_s[n] - step_s["CLIP"]) / step_s["CLIP"] for n in ("CyCLIP", "m2-Mix")}}


def use(trainer, loss_cfg, objective) -> None:
    """Swap the trainer's objective: its step function holds its own reference (train/core/step.py), so both
    are set (the trainer's for draw_lambda, the step's for the loss); cfg.loss decides whether m2-Mix draws."""
    trainer.cfg.loss, trainer.objective, trainer.step_fn.objective = loss_cfg, objective, objective


def free_memory(cuda: bool, reset_peak: bool = False) -> None:
    """Collect garbage and hand CUDA's cached blocks back; ``reset_peak``: start a new peak-memory window."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(cuda: bool) -> float:
    """The peak since the last reset: CUDA's max_memory_allocated, or this process's max RSS on the CPU (GiB)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
