"""`make gpu-check` on a machine without a GPU: one clear line and exit status 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_gpu_check_without_a_gpu_fails_with_one_line():
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines[-1].startswith("gpu-check: no CUDA GPU visible"), out.stderr[-2000:]
    assert "--cpu-dry-run" in lines[-1] and out.stdout == ""
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before
