"""The package boundaries of docs/ARCHITECTURE.md, checked on the source and on a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The end-to-end drivers use the demo data set's captions and class names (docs/ARCHITECTURE.md).
TRAIN_MAY_IMPORT_PIPELINE = {"train/study.py", "train/study_lib.py", "train/demo_report.py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import statement in a file (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("common", {"torch", "deepspeed", "img2dataset", "open_clip", "pipeline", "train"}),
    ("pipeline", {"torch", "deepspeed", "open_clip", "train"}),
])
def test_lower_layers_do_not_import_upper_ones(package, forbidden):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden) for p in sources(package)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_train_imports_pipeline_only_in_the_end_to_end_drivers():
    users = {str(p.relative_to(ROOT)) for p in sources("train") if "pipeline" in imported_packages(p)}
    assert users <= TRAIN_MAY_IMPORT_PIPELINE, users - TRAIN_MAY_IMPORT_PIPELINE


def test_common_loads_without_torch_in_a_fresh_interpreter():
    # Shell scripts call `python -m common.jobs`; it must stay a fraction of a second (no torch import).
    code = ("import sys, common.jobs, common.config_loader, common.atomic_files, common.shard_folder; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'img2dataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
