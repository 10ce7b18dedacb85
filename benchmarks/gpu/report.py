"""The GPU check's section of BENCHMARKS.md, from the parts' results (a failed part shows as its error)."""
from __future__ import annotations

from benchmarks.gpu.resume import RESUME_RTOL


def section(gpu: str, s: dict, parts: dict, failed: dict, elapsed: float) -> str:
    """Markdown for ``parts`` ({part: result}) and ``failed`` ({part: error}); ``elapsed`` in seconds."""
    lines = ["## GPU check (`make gpu-check`)", "",
             f"GPU: **{gpu}**. {s['model']} at {s['image']} px, batch {s['batch']}, bf16 (this trainer: "
             "zero.precision=bf16, zero.bf16_mode=autocast, ZeRO-1, world size 1 over "
             f"{'NCCL' if s['device'] == 'cuda' else 'gloo'}; open_clip_train: --precision amp_bf16), gradient "
             f"clipping 1.0 in both. Whole check: {elapsed:.0f} s.", ""]
    t = parts.get("throughput")
    if t:
        b, o = t["samples_per_s"]["open_clip_train step"], t["samples_per_s"]["this trainer"]
        lines += [f"In one process, same pinned synthetic batches, {t['rounds']} alternating rounds of "
                  f"{t['window_steps']}-step windows (median samples/s; ratio = median of the per-round ratios):", "",
                  "| step | samples/s | ratio |", "|---|---|---|",
                  f"| open_clip_train's step (autocast bf16, ClipLoss, clip_grad_norm_, torch AdamW) | {b:.1f} | 1.00x |",
                  f"| this trainer's step (DeepSpeed ZeRO-1) | {o:.1f} | **{t['ratio']:.2f}x** |", ""]
    m = parts.get("mfu_memory")
    if m:
        mfu = (f"{100 * m['mfu']:.1f}% of {m['peak_tflops']:.1f} TFLOP/s dense bf16" if m["mfu"] is not None
               else "n/a (no bf16 peak known for this device: --peak-tflops)")
        lines += [f"MFU of this trainer's step: {mfu} ({m['flops_per_sample'] / 1e9:.1f} GFLOP per sample forward + "
                  f"backward at {m['samples_per_s']:.1f} samples/s). Peak memory of its step: {m['peak_gib']:.2f} GiB "
                  f"({m['memory']}).", ""]
    k = parts.get("knobs")
    if k:
        lines += [f"Knobs on this trainer's step ({k['window_steps']}-step window each after a warm-up; compile: "
                  f"`run.compile_backend={k['compile_backend']}`; MFU in model FLOPs, recomputation not counted):", "",
                  "| configuration | samples/s | peak memory GiB | MFU | first window incl. compile (s) |",
                  "|---|---|---|---|---|"]
        for name, row in k["rows"].items():
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            lines.append(f"| {name} | {row['samples_per_s']:.1f} | {row['peak_gib']:.2f} | {mfu} | "
                         f"{k['first_window_s'][name]} |")
        lines += [f"| {name} | skipped (budget) | | | |" for name in k["skipped"]] + [""]
    g = parts.get("largest_batch")
    if g:
        lines += [f"Largest {g['model']} batch at {g['image']} px (one open_clip step: autocast bf16, CLIP loss, "
                  f"AdamW; doubling up to {g['cap']}): **{g['without']}** without, **{g['with']}** with gradient "
                  f"checkpointing (tried: {g['tried']}).", ""]
    c = parts.get("loss_costs")
    if c:
        lines += [f"Loss cost ({c['rounds']} rounds of {c['window_steps']}-step windows, median):", "",
                  "| loss | step time (s) | cost vs a CLIP step |", "|---|---|---|"]
        for name, step in c["step_s"].items():
            cost = "-" if name == "CLIP" else f"{c['cost_pct'][name]:+.1f}%"
            lines.append(f"| {name} | {step:.4f} | {cost} |")
        lines.append("")
    r = parts.get("resume")
    if r:
        at = s["tiny_steps"] - s["tiny_every"]
        lines += [f"Resume (tiny_vit, bf16, {'NCCL' if s['device'] == 'cuda' else 'gloo'}, world size 1, "
                  f"{s['tiny_steps']} steps, checkpoint every {s['tiny_every']}, SIGKILL once the step-{at} checkpoint "
                  f"was committed, resumed from step {at}): final loss {r['final_loss']:.5f} uninterrupted, "
                  f"{r['resumed_final_loss']:.5f} resumed; largest relative difference over the resumed steps "
                  f"{r['max_rel_diff']:.2e} (tolerance {RESUME_RTOL:g}): **{'pass' if r['ok'] else 'FAIL'}**.", ""]
    w = parts.get("rows")
    if w:
        lines += ["Separate processes (the real open_clip_train; median of logged steps after the first third):", "",
                  "| run | samples/s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in w["samples_per_s"].items()]
        lines += [f"| {k} | failed: {v.splitlines()[0][:200]} |" for k, v in w["errors"].items()]
        lines.append("")
    for name, err in failed.items():
        lines.append(f"Part `{name}` failed: {err.splitlines()[0][:300] if err else ''}")
    return "\n".join(lines).rstrip() + "\n"
