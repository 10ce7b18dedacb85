"""Gradient checkpointing (``model.grad_checkpointing``): peak memory and seconds per step, ViT-B-32.

Each case runs in a fresh subprocess (``python -m benchmarks.bench_knobs CASE_JSON``) so that its peak memory
is its own, measured as benchmarks/bench_losses.py does: glibc's mmap threshold fixed (freed large buffers
leave the resident set), the resident high-water mark reset through /proc/self/clear_refs just before the
first full-size step, peak = VmHWM minus the resident size then (weights and inputs already allocated, the
weight gradients not: both cases allocate those 578 MiB inside the step). One step is the trainer's own
``ContrastiveStep`` (forward, CLIP loss, backward; no optimizer), fp32 on the CPU, after a warm-up step at
batch 2 whose gradients are dropped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.bench_losses import _peak_since, _start_peak

MODEL, BATCH, IMAGE = "ViT-B-32", 32, 224


def _measure(case: dict) -> dict:
    import torch

    from train.config import LossConfig, ModelConfig
    from train.core.step import ContrastiveStep
    from train.losses.objective import ContrastiveObjective
    from train.model.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=MODEL, force_image_size=case["image"],
                                    grad_checkpointing=case["checkpointing"]))[0].train()
    step = ContrastiveStep(model, ContrastiveObjective(LossConfig(), 0), 100.0)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(case["batch"], 3, case["image"], case["image"], generator=gen)
    texts = torch.randint(1, 49407, (case["batch"], 77), generator=gen)
    step(images[:2], texts[:2], None)    # warm-up: thread pools, lazily loaded kernels
    model.zero_grad(set_to_none=True)
    before = _start_peak()
    times, losses = [], []
    for i in range(case["steps"]):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        losses.append(float(step(images, texts, None)["loss"]))
        times.append(time.perf_counter() - start)
        if i == 0:
            peak_kib = _peak_since(before)
    grads_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"seconds": min(times), "peak_mib": peak_kib / 1024, "grads_mib": grads_mib, "loss": losses[0]}


def _run_case(case: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_knobs", json.dumps(case)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> str:
    image, batch, steps = (64, 8, 1) if quick else (IMAGE, BATCH, 2)
    results = {gc: _run_case({"checkpointing": gc, "image": image, "batch": batch, "steps": steps})
               for gc in (False, True)}
    off, on = results[False], results[True]
    act_off, act_on = (max(r["peak_mib"] - r["grads_mib"], 0.1) for r in (off, on))
    lines = [f"## Memory and speed knobs: gradient checkpointing, {MODEL}", "",
             f"`model.grad_checkpointing`, {MODEL} at {image} px, batch {batch}, fp32, CPU (torch's default threads), "
             "one training step of the trainer's `ContrastiveStep` (forward, CLIP loss, backward; no optimizer). "
             "Each column a fresh subprocess; peak = extra resident memory of the first full-size step (resident "
             "high-water mark reset just before it, glibc's mmap threshold fixed as in the losses section); "
             f"peak − grads = peak minus the {off['grads_mib']:.0f} MiB of weight gradients both allocate in the "
             "step (a rough measure of the activations: at the peak, mid-backward, some gradients may not exist yet and some "
             "activations are already freed). "
             f"Seconds: the best of {steps} step(s).", "",
             "| | off | on | on / off |", "|---|---|---|---|",
             f"| peak MiB | {off['peak_mib']:.0f} | {on['peak_mib']:.0f} | {on['peak_mib'] / off['peak_mib']:.2f} |",
             f"| peak − grads MiB | {act_off:.0f} | {act_on:.0f} | {act_on / act_off:.2f} |",
             f"| s per step | {off['seconds']:.2f} | {on['seconds']:.2f} | {on['seconds'] / off['seconds']:.2f} |",
             f"| first-step loss | {off['loss']:.6f} | {on['loss']:.6f} | |", "",
             "Checkpointing keeps only each residual block's input and recomputes the block in backward: the "
             "activation memory falls to those inputs plus one block's, for one more forward of each block in "
             "backward (on this CPU the backward dominates the step, so it cost less than the textbook third). "
             "The losses are the same (the math is unchanged; tests/train/model/test_knobs.py)."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
