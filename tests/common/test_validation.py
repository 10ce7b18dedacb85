"""One validation layer for every schema, tested on cases generated from the dataclasses themselves.

Every numeric field (found here by walking the field *types*, independently of common/validation.py's walk
over values) refuses NaN and ±inf through a real ``key=value`` override; every declared bound refuses the
value just past it and accepts the value at it; every renamed key is refused naming its new name; and
loading any config imports no torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import typing

import pytest
import yaml

from common.config_loader import load_config
from common.errors import ConfigError
from common.validation import Range, get_field

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
# Every schema loaded with load_config: (module, class name, a YAML that loads, or None for the defaults).
SCHEMAS = [("train.config", "TrainConfig", "configs/pretrain_cyclip.yaml"),
           ("pipeline.settings", "IngestConfig", "configs/shards_web.yaml"),
           ("train.evaluate.config", "EvalConfig", None),
           ("train.experiments.study.config", "StudyConfig", "configs/study/cpu.yaml"),
           ("train.experiments.demo.config", "DemoConfig", "configs/demo/fast.yaml")]


def schema(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def numeric_keys(cls, prefix: str = "") -> list[tuple[str, type, bool]]:
    """(dotted key, int or float, is a list) of every numeric field of a dataclass type, recursively."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        is_list = typing.get_origin(tp) in (list, typing.List)
        inner = typing.get_args(tp)[0] if is_list else tp
        if dataclasses.is_dataclass(tp):
            out += numeric_keys(tp, f"{prefix}{f.name}.")
        elif inner in (int, float):
            out.append((prefix + f.name, inner, is_list))
    return out


CASES = [(m, n, key, kind, is_list, bad) for m, n, _ in SCHEMAS
         for key, kind, is_list in numeric_keys(schema(m, n)) for bad in ("nan", "inf", "-inf")]


def test_every_schema_has_numeric_fields_to_check():
    counts = {n: len(numeric_keys(schema(m, n))) for m, n, _ in SCHEMAS}
    assert all(c >= 5 for c in counts.values()), counts


@pytest.mark.parametrize("module, name, key, kind, is_list, bad", CASES,
                         ids=[f"{c[1]}:{c[2]}={c[5]}" for c in CASES])
def test_nan_and_inf_are_refused_naming_the_key(module, name, key, kind, is_list, bad):
    value = f"[{bad}]" if is_list else bad
    with pytest.raises(ConfigError) as err:
        load_config(schema(module, name), None, [f"{key}={value}"])
    message = str(err.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize("module, name, path", SCHEMAS, ids=[s[1] for s in SCHEMAS])
def test_nan_in_a_yaml_file_is_refused_naming_the_key(module, name, path, tmp_path):
    key, kind, is_list = next(k for k in numeric_keys(schema(module, name)) if k[1] is float)
    tree: dict = {}
    node = tree
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = [float("nan")] if is_list else float("nan")
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')} must be a finite number"):
        load_config(schema(module, name), file)


def bound_cases():
    cases = []
    for module, name, _ in SCHEMAS:
        cls = schema(module, name)
        kinds = {k: (kind, lst) for k, kind, lst in numeric_keys(cls)}
        for key, rule in getattr(cls, "BOUNDS", {}).items():
            if isinstance(rule, Range) and rule.low is not None and key in kinds:
                kind, is_list = kinds[key]
                step = 1 if kind is int else 0.001
                at = rule.low + (step if rule.low_open else 0)
                cases.append((module, name, key, kind, is_list, rule.low - (0 if rule.low_open else step), at))
    return cases


@pytest.mark.parametrize("module, name, key, kind, is_list, past, at", bound_cases(),
                         ids=[f"{c[1]}:{c[2]}" for c in bound_cases()])
def test_every_declared_lower_bound_refuses_past_it_and_accepts_at_it(module, name, key, kind, is_list, past, at):
    cls = schema(module, name)
    text = lambda v: f"[{kind(v)!r}]" if is_list else repr(kind(v))  # noqa: E731
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')} must be"):
        load_config(cls, None, [f"{key}={text(past)}"])
    cfg = load_config(cls, None, [f"{key}={text(at)}"])
    assert get_field(cfg, key) == yaml.safe_load(text(at))


RENAMES = [(m, n, old, new) for m, n, _ in SCHEMAS for old, new in getattr(schema(m, n), "RENAMED", {}).items()]


def test_the_renames_of_issue_19_are_declared():
    assert {(old, new) for *_, old, new in RENAMES} >= {
        ("data.partitions", "data.streams"), ("workers", "num_workers"),
        ("download.backoff_seconds", "download.retry_backoff_s")}


@pytest.mark.parametrize("module, name, old, new", RENAMES, ids=[r[2] for r in RENAMES])
def test_a_renamed_key_is_refused_naming_the_new_one(module, name, old, new, tmp_path):
    cls = schema(module, name)
    value = get_field(cls(), new)
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [f"{old}={value}"])
    assert str(err.value) == f"command line: {old} was renamed to {new}; use {new}"
    tree: dict = {}
    node = tree
    for part in old.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[old.split(".")[-1]] = value
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=f"{old.replace('.', '[.]')} was renamed to {new.replace('.', '[.]')}"):
        load_config(cls, tmp_path / "old.yaml")
    assert get_field(load_config(cls, None, [f"{new}={value}"]), new) == value  # the new name works


@pytest.mark.parametrize("module, name, path", SCHEMAS, ids=[s[1] for s in SCHEMAS])
def test_loading_a_config_imports_no_torch(module, name, path):
    code = (f"import sys; from common.config_loader import load_config; from {module} import {name}; "
            f"load_config({name}, {path!r}); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("argv, key", [
    (["-m", "train", "--dry-run", "--config", "configs/pretrain_cyclip.yaml", "optim.lr=nan"], "optim.lr"),
    (["-m", "train", "--dry-run", "--config", "configs/pretrain_cyclip.yaml", "data.retry_backoff_s=inf"],
     "data.retry_backoff_s"),
    (["-m", "pipeline", "run", "--urls", "{tmp}/urls.csv", "--out", "{tmp}/out", "download.timeout=nan"],
     "download.timeout"),
    (["-m", "train.evaluate", "--checkpoint", "{tmp}/none", "logit_scale=-inf"], "logit_scale"),
    (["-m", "train.experiments.study", "--config", "configs/study/cpu.yaml", "pretrain_lrs=[nan]"], "pretrain_lrs"),
], ids=["train-lr", "train-backoff", "pipeline", "evaluate", "study"])
def test_entry_points_refuse_nan_in_one_line_with_exit_2(argv, key, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")  # never fetched
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("config error: ") and key in lines[0], lines
