"""`make bench`: run every benchmarks/bench_*.py and rewrite BENCHMARKS.md.

Each module exposes ``run(quick: bool) -> str`` returning one markdown section (a ``## `` title,
a table of side-by-side measurements and their ratios, and a short note). Ratios are measured
in the same process, back to back, because absolute timings on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, GPU: {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", default=None, help="bench module names (without bench_)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    names = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "benchmarks")]) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n.removeprefix("bench_") in args.only]
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    stamp = f"_Measured on {describe_machine()}; {time.strftime('%Y-%m-%d')}, commit {git_commit()}"
    stamp += " (--quick sizes)._" if args.quick else "._"
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        section = module.run(quick=args.quick).rstrip()
        title, _, body = section.partition("\n")
        (results / f"{name}.md").write_text(f"{title}\n\n{stamp}\n{body}\n")
        print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"wrote {write_benchmarks_md(Path(args.out))}")


def write_benchmarks_md(out: Path) -> Path:
    """BENCHMARKS.md is every section's latest file in benchmarks/results, so `--only X` refreshes X and
    keeps the rest (benchmarks/gpu_check.py writes its section there too)."""
    header = ("# Benchmarks\n\nWritten by `make bench` (`python -m benchmarks.run`). Every table was "
              "measured side by side in one run on the machine named under its title; compare the "
              "ratios, not absolute times across tables.\n\n")
    body = "\n".join(f.read_text() for f in sorted((ROOT / "benchmarks" / "results").glob("bench_*.md")))
    out.write_text(header + body)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"

if __name__ == "__main__":
    sys.exit(main())
