"""`make gpu-wheels`: .whl/ <- the wheels the device machine lacks; the rehearsal's list of the image's packages.

    python -m benchmarks.gpu_wheels wheels   # .whl/: cp312 manylinux x86_64 wheels of benchmarks/gpu_wheels.txt's
                                             # `carry` names, constraints.txt's versions, one of each, < 40 MB
    python -m benchmarks.gpu_wheels image    # NAME==VERSION per line: the image's packages (`image` lines)

Downloads happen here and nowhere else (the tests never import this module's network paths).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "benchmarks" / "gpu_wheels.txt"
CONSTRAINTS = ROOT / "constraints.txt"
DEST = ROOT / ".whl"
MAX_MB = 40
"""The device call carries the working tree and .whl/ together under 64 MiB: the wheels get at most 40 MB."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
"""The device image's Python is CPython 3.12 on x86-64 (KINDS.md); pip matches these tags exactly."""


def canon(name: str) -> str:
    """A distribution name as PEP 503 normalises it (``Open_Clip.torch`` -> ``open-clip-torch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canon(name)] = version.strip()
    return out


def entries(kind: str) -> list[str]:
    """The ``kind`` (carry/image) lines of gpu_wheels.txt as NAME==VERSION (constraints.txt's unless given)."""
    versions, out = pins(), []
    for line in LIST.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) != 2 or words[0] != kind:
            continue
        spec = words[1]
        if "==" not in spec:
            if canon(spec) not in versions:
                sys.exit(f"gpu-wheels: {spec} ({LIST.name}) has no version in constraints.txt; add one there")
            spec = f"{spec}=={versions[canon(spec)]}"
        out.append(spec)
    return out


def build(dest: Path = DEST) -> Path:
    """Fill ``dest`` (emptied first) with the `carry` wheels; returns it. Exits with one line if the total is over
    MAX_MB or a package came out in two versions."""
    specs = entries("carry")
    deepspeed = [s for s in specs if canon(s.split("==")[0]) == "deepspeed"]
    others = [s for s in specs if s not in deepspeed]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *others],
                   check=True)
    # DeepSpeed publishes an sdist only: built here, ops left to its JIT (DS_BUILD_OPS=0), so a py3-none-any wheel.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, *deepspeed], check=True,
                       env=dict(os.environ, DS_BUILD_OPS="0"))
        for wheel in Path(tmp).glob("*.whl"):
            shutil.move(str(wheel), dest / wheel.name)
    wheels = sorted(dest.glob("*.whl"))
    names = [canon(w.name.split("-")[0]) for w in wheels]
    if len(set(names)) != len(names) or len(wheels) != len(specs):
        sys.exit(f"gpu-wheels: expected one wheel per carried package ({len(specs)}), got {[w.name for w in wheels]}")
    total = sum(w.stat().st_size for w in wheels) / 1e6
    if total > MAX_MB:
        sys.exit(f"gpu-wheels: {dest} holds {total:.1f} MB, over the {MAX_MB} MB the device call leaves for wheels")
    print(f"gpu-wheels: {len(wheels)} wheels, {total:.1f} MB in {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("wheels", "image"))
    args = parser.parse_args(argv)
    if args.what == "image":
        print("\n".join(entries("image")))
    else:
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
