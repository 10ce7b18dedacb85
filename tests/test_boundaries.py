"""The layers of docs/ARCHITECTURE.md, checked on the source (every import statement) and on a fresh interpreter.

    common  ←  pipeline
    common  ←  train (core, losses, data, model, evaluate, launch)  ←  train/experiments
                                                   pipeline/demo  ←  train/experiments
    benchmarks may import common, pipeline, train; tests import anything; nothing imports tests or experiments.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every absolute module an import statement of ``path`` names (module level and inside functions);
    ``from a.b import c`` counts as ``a.b`` and ``a.b.c``, so a submodule imported by name is seen."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def offenders(files: list[Path], forbidden: list[str], allowed: tuple[str, ...] = ()) -> dict:
    found = {}
    for path in files:
        bad = sorted(n for n in imports(path)
                     if any(under(n, f) for f in forbidden) and not any(under(n, a) for a in allowed))
        if bad:
            found[str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name] = bad
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("common", ["torch", "deepspeed", "img2dataset", "open_clip", "pipeline", "train", "tests", "benchmarks"]),
    ("pipeline", ["torch", "deepspeed", "open_clip", "train", "tests", "benchmarks"]),
    ("benchmarks", ["tests"]),
])
def test_lower_layers_do_not_import_upper_ones(folder, forbidden):
    assert offenders(sources(folder), forbidden) == {}


def test_train_core_rooms_import_neither_pipeline_nor_experiments():
    rooms = [p for p in sources("train") if "experiments" not in p.relative_to(ROOT).parts]
    assert offenders(rooms, ["pipeline", "train.experiments", "tests", "benchmarks"]) == {}


def test_experiments_import_only_the_demo_source_of_pipeline():
    assert offenders(sources("train/experiments"), ["pipeline", "tests", "benchmarks"], ("pipeline.demo",)) == {}


def test_the_boundary_check_sees_a_violation(tmp_path):
    # The checker itself can fail: function-level imports of an upper layer are found, allowed ones are not.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from train.experiments.study import lib\n    import pipeline.stages.reshard\n"
                   "    from pipeline.demo.source import CLASSNAMES\n")
    assert offenders([bad], ["pipeline", "train.experiments"], ("pipeline.demo",)) == {
        "bad.py": ["pipeline.stages.reshard", "train.experiments.study", "train.experiments.study.lib"]}


def test_common_loads_without_torch_in_a_fresh_interpreter():
    # Shell scripts call `python -m common.jobs`; it must stay a fraction of a second (no torch import).
    mods = sorted(p.stem for p in (ROOT / "common").glob("*.py") if p.stem != "__init__")
    code = (f"import sys, importlib; [importlib.import_module('common.' + m) for m in {mods!r}]; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'img2dataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
