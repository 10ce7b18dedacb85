"""`make bench`: run every benchmarks/bench_*.py and write its section of BENCHMARKS.md.

Each module exposes ``run(quick: bool) -> str`` returning one markdown section (a ``## `` title,
a table of side-by-side measurements and their ratios, and a short note). Ratios are measured
in the same process, back to back, because absolute timings on shared machines are noisy.

Where results go: BENCHMARKS.md at the repository root, and nowhere else (`make gpu-check` writes its
section there too). It is the file the README, docs/ and the configs cite for every figure, so it is the
one that must be current; a second copy (the per-section files benchmarks/results/ used to hold) could
only drift from it. Each section follows a ``<!-- section: NAME -->`` marker, so ``--only X`` replaces
X's section in place and keeps the others as they were measured.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from common.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by `make bench` (`python -m benchmarks.run`). Every table was "
          "measured side by side in one run on the machine named under its title; compare the "
          "ratios, not absolute times across tables.\n\n")
MARKER = re.compile(r"^<!-- section: ([\w.-]+) -->\n", re.MULTILINE)


def describe_machine() -> str:
    cpu = cpu_name()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, GPU: {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", default=None, help="bench module names (without bench_)")
    parser.add_argument("--out", default=str(RESULTS), help="the results file (default: BENCHMARKS.md)")
    args = parser.parse_args()
    names = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "benchmarks")]) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n.removeprefix("bench_") in args.only]
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        write_section(Path(args.out), name, module.run(quick=args.quick), quick=args.quick)
        print(f"   done in {time.perf_counter() - t0:.0f} s; its section of {args.out} rewritten", flush=True)


def stamp(quick: bool = False) -> str:
    """The line under each section's title: machine, date, commit."""
    sizes = " (--quick sizes)" if quick else ""
    return f"_Measured on {describe_machine()}; {time.strftime('%Y-%m-%d')}, commit {git_commit()}{sizes}._"


def read_sections(path: Path) -> dict[str, str]:
    """NAME -> section text (the markdown after its marker) of a results file; {} when it has none yet."""
    text = path.read_text() if path.exists() else ""
    parts = MARKER.split(text)    # [header, name1, text1, name2, text2, ...]
    return {name: body.rstrip("\n") + "\n" for name, body in zip(parts[1::2], parts[2::2])}


def write_section(path: Path, name: str, section: str, quick: bool = False) -> Path:
    """Put ``section`` (its ``## `` title line first), stamped under the title, into ``path`` as the section
    NAME, replacing an earlier one of that name; the other sections stay as they are, in name order."""
    title, _, body = section.strip("\n").partition("\n")
    sections = read_sections(path)
    sections[name] = f"{title}\n\n{stamp(quick)}\n{body}\n"
    path.write_text(HEADER + "\n".join(f"<!-- section: {n} -->\n{sections[n]}" for n in sorted(sections)))
    return path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
