"""`make gpu-check`: the trainer on one GPU, ~5 min on an H200, results as JSON lines and into BENCHMARKS.md.

Parts, in order of value, each with its own budget (benchmarks/gpu/parts.py), guarded, and written to
OUT/results.jsonl the moment it ends:
1. throughput: in one process, this trainer's step against open_clip_train's step (benchmarks/gpu/inproc.py),
   ViT-B-32 at 224 px, batch 256, bf16, alternating windows on the same pinned batches;
2. mfu_memory: MFU (torch's FlopCounterMode, against the GPU's dense bf16 peak) and peak GPU memory;
3. loss_costs: CyCLIP and m2-Mix as % of a CLIP step;
4. knobs: samples/s, peak memory and MFU with gradient checkpointing and torch.compile on/off (benchmarks/gpu/knobs.py;
   after the loss costs, on the same trainer: a compile cannot be undone in place);
5. largest_batch: the largest ViT-L-14 batch of one step, without and with gradient checkpointing;
6. resume: tiny_vit over NCCL, kill -9 after a checkpoint, resumed, compared (benchmarks/gpu/resume.py);
7. rows: separate processes against the real open_clip_train, synthetic data and real JPEGs (benchmarks/gpu/rows.py).

Without a CUDA GPU it exits with status 2 and one line saying so. ``--cpu-dry-run`` runs every part at toy sizes
on the CPU (gloo, ViT-S-32 at 64 px) and prints its section without writing BENCHMARKS.md. OUT: --out, else $OUT,
else logs/gpu-check/. The exit status is 0 only when every part passed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu import inproc, knobs, report
from benchmarks.gpu.parts import ROOT, Results, check_env, peak_tflops, sizes
from benchmarks.gpu.resume import resume
from benchmarks.gpu.rows import rows
from common.errors import EXIT_USER_ERROR

SECTION = "bench_trainer_gpu"
"""This check's section of BENCHMARKS.md (benchmarks/run.py: sections are replaced by name)."""


def check_gpu(dry: bool) -> str:
    """The GPU's name; exits with EXIT_USER_ERROR and one line when none is visible (unless ``dry``)."""
    if dry:
        return "none (--cpu-dry-run: CPU, toy sizes)"
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine with "
              "one GPU, or `python -m benchmarks.gpu_check --cpu-dry-run` to exercise it on the CPU", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    return torch.cuda.get_device_name(0)


def write_benchmarks(section: str) -> Path:
    """The section into BENCHMARKS.md (replacing this check's earlier one; the other sections stay)."""
    from benchmarks.run import RESULTS, write_section

    return write_section(RESULTS, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU; prints, writes nothing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else logs/gpu-check)")
    parser.add_argument("--append", action="store_true", help="add to OUT/results.jsonl instead of starting it anew")
    args = parser.parse_args(argv)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.exit(EXIT_USER_ERROR, f"gpu-check: --peak-tflops must be > 0, got {args.peak_tflops}\n")
    gpu = check_gpu(args.cpu_dry_run)
    s = sizes(args.cpu_dry_run)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "logs" / "gpu-check")
    results = Results(out)
    if not args.append:
        results.path.unlink(missing_ok=True)
    check_env()
    peak = args.peak_tflops or (None if args.cpu_dry_run else peak_tflops(gpu))
    results.write(dict(part="start", ok=True, gpu=gpu, torch=torch.__version__, sizes=s, peak_tflops=peak))
    t0, box, budget = time.perf_counter(), [], s["budget"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from benchmarks.digits import make_digits_dataset

        data = inproc.bench_data(tmp, s)
        t = results.run_part("throughput", budget["throughput"], lambda b: inproc.throughput(box, tmp, data, s, b))
        if box:
            rate = t["samples_per_s"]["this trainer"] if t else None
            m = results.run_part("mfu_memory", budget["mfu_memory"],
                                 lambda b: inproc.mfu_memory(box, rate, gpu, peak, b))
            flops = m["flops_per_sample"] if m else None
            results.run_part("loss_costs", budget["loss_costs"], lambda b: inproc.loss_costs(box, b))
            # last on this trainer: a compile cannot be undone in place (the loss costs are uncompiled steps)
            results.run_part("knobs", budget["knobs"], lambda b: knobs.knobs(box, flops, peak, b))
            box[0].close()
            box.clear()
            inproc.free_memory(torch.cuda.is_available())
        results.run_part("largest_batch", budget["largest_batch"],
                         lambda b: knobs.largest_batch(s, torch.device(s["device"]), b))
        tiny = make_digits_dataset(tmp / "digits32", n_train=640, n_val=16, shard_size=128)
        results.run_part("resume", budget["resume"], lambda b: resume(tmp, tiny, s, b))
        results.run_part("rows", budget["rows"], lambda b: rows(tmp, s, b))
    text = report.section(gpu, s, results.parts, results.failed, time.perf_counter() - t0)
    (out / "section.md").write_text(text)
    print(text)
    if not args.cpu_dry_run:
        print(f"gpu-check: wrote {write_benchmarks(text)}")
    ok = len(results.parts) == len(budget) and all(r.get("ok", True) for r in results.parts.values())
    results.write(dict(part="end", ok=ok, seconds=round(time.perf_counter() - t0, 1)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
