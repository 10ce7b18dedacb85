"""The knob parts of the GPU check: gradient checkpointing and torch.compile on this trainer's step, and the
largest batch a big model takes with and without checkpointing.

``knobs`` toggles the knobs on the Bench's trainer in place, the way the trainer applies them
(train/model/knobs.py): ``set_grad_checkpointing`` on the engine's module, ``compile_module`` on the engine.
Configurations, in order: plain, checkpointing, checkpointing + compile, compile alone (a recompile: dynamo
guards on the checkpointing flag); each a warm-up (the compile happens there) and a window of steps with the
peak memory reset before it; the last ones are skipped when the budget would not hold them. MFU is model FLOPs
(the mfu_memory part's count: the recomputed forward of checkpointing is not counted, as MFU defines it).

``largest_batch`` builds ``s["big_model"]`` alone (after the Bench is closed): open_clip's model, autocast bf16,
torch AdamW, one step per batch size, doubling from ``big_batch0`` until CUDA runs out of memory or
``big_batch_cap``; without and with checkpointing. The trainer adds DeepSpeed's flat buffers on top, so the
trainer's own limit is somewhat lower.
"""
from __future__ import annotations

import time

import torch

from benchmarks.gpu.inproc import free_memory, peak_memory_gib
from benchmarks.gpu.parts import Budget
from train.model.knobs import compile_module

CONFIGS = (("plain", False, False), ("grad_checkpointing", True, False), ("grad_checkpointing+compile", True, True),
           ("compile", False, True))
"""(row name, gradient checkpointing, torch.compile) in the order measured."""


def knobs(bench_box: list, flops_per_sample: float | None, peak: float | None, budget: Budget) -> dict:
    """Samples/s, peak memory (GiB; max RSS on the CPU) and MFU per configuration of CONFIGS on the Bench's
    trainer; {"rows": {name: {...}}, "skipped": [names], "compile_backend", "first_window_s": {name: s}}."""
    bench = bench_box[0]
    s, module = bench.s, bench.trainer.engine.module
    rows, skipped, first = {}, [], {}
    compiled, slowest = False, 0.0
    for name, ckpt, compile_ in CONFIGS:
        if rows and budget.left() < 1.5 * slowest + (s["compile_s"] if compile_ else 0):
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        module.set_grad_checkpointing(ckpt)
        if compile_ and not compiled:
            compile_module(bench.trainer.engine, s["compile_backend"])
            compiled = True
        bench.window(bench.trainer.train_step, s["warmup"])   # compiles (again) here
        first[name] = round(time.perf_counter() - t0, 1)
        budget.check(f"{name}'s warm-up")
        free_memory(bench.cuda, reset_peak=True)
        rate = bench.window(bench.trainer.train_step, s["window"])
        peak_gib = peak_memory_gib(bench.cuda)
        mfu = rate * flops_per_sample / (peak * 1e12) if flops_per_sample and peak else None
        rows[name] = {"samples_per_s": rate, "peak_gib": peak_gib, "mfu": mfu}
        slowest = max(slowest, time.perf_counter() - t0)
    module.set_grad_checkpointing(False)
    return {"rows": rows, "skipped": skipped, "compile_backend": s["compile_backend"], "first_window_s": first,
            "window_steps": s["window"]}


def largest_batch(s: dict, device: torch.device, budget: Budget) -> dict:
    """{"model", "without": largest batch, "with": largest batch, "tried": {mode: {batch: "ok" | "oom"}}}; a
    mode stops at its first out-of-memory, at ``big_batch_cap`` or when the budget would not hold another try."""
    import open_clip

    out = {"model": s["big_model"], "image": s["big_image"], "cap": s["big_batch_cap"], "tried": {}}
    for mode, ckpt in (("without", False), ("with", True)):
        model = open_clip.create_model(s["big_model"], force_image_size=s["big_image"], device=device).train()
        model.set_grad_checkpointing(ckpt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tried, best, batch, last_s = {}, 0, s["big_batch0"], 0.0
        while batch <= s["big_batch_cap"] and budget.left() > 3 * last_s:
            t0 = time.perf_counter()
            try:
                _one_step(model, opt, batch, s["big_image"], device)
                tried[batch], best = "ok", batch
            except torch.OutOfMemoryError:
                tried[batch] = "oom"
                break
            finally:
                opt.zero_grad(set_to_none=True)
                free_memory(device.type == "cuda")
            last_s = time.perf_counter() - t0
            batch *= 2
        out[mode], out["tried"][mode] = best, tried
        del model, opt
        free_memory(device.type == "cuda")
    return out


def _one_step(model, opt, batch: int, image: int, device: torch.device) -> None:
    """One open_clip_train-like step at ``batch``: autocast bf16 forward, CLIP loss, backward, AdamW."""
    from open_clip.loss import ClipLoss

    images = torch.randn(batch, 3, image, image, device=device)
    texts = torch.randint(1, 49407, (batch, model.context_length), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = ClipLoss()(image_features, text_features, logit_scale)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()   # an out-of-memory error surfaces here, inside the try
