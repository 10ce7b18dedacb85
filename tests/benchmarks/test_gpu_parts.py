"""The GPU check's pieces that need no GPU and no network: the peak table, PYTHONPATH kept, the wheel list."""
from __future__ import annotations

import json
import os

from benchmarks.gpu.parts import peak_tflops
from benchmarks.gpu_wheels import canon, entries
from train.launch.local import pythonpath, rank_env


def test_peak_table_tells_sxm_nvl_and_pcie_apart():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("Some Future GPU") is None


def test_child_pythonpath_keeps_the_existing_one(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    parts = pythonpath().split(os.pathsep)
    assert parts[1:] == ["/tmp/site"] and parts[0].endswith(os.sep) is False
    assert rank_env(1)["PYTHONPATH"] == pythonpath()


def test_every_carried_wheel_is_pinned_once():
    carried = entries("carry")
    names = [canon(spec.split("==")[0]) for spec in carried]
    assert len(names) == len(set(names)) and all("==" in spec for spec in carried)
    assert "deepspeed" in names and "torch" not in names
    assert any(spec.startswith("torch==2.11.0") for spec in entries("image"))


def test_a_failing_part_leaves_its_line_and_log_and_the_next_part_runs(tmp_path):
    from benchmarks.gpu.parts import Results

    results = Results(tmp_path)
    assert results.run_part("broken", 5, lambda budget: 1 / 0) is None
    assert results.run_part("fine", 5, lambda budget: {"x": 1}) == {"x": 1}
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["part"], r["ok"]) for r in lines] == [("broken", False), ("fine", True)]
    assert "ZeroDivisionError" in lines[0]["error"] and "ZeroDivisionError" in (tmp_path / "failed.log").read_text()


def test_the_in_process_trainer_at_gpu_sizes_passes_the_preflight(tmp_path):
    """The device's sizes (ViT-B-32, global batch 256) on the shards the check builds: the trainer's own
    preflight (data order, model, knobs) must accept them here, or the first part fails there (--cpu-dry-run's
    batch of 8 would not show it: a 64-sample set once refused the batch of 256)."""
    from benchmarks.gpu.inproc import bench_config, bench_data
    from benchmarks.gpu.parts import sizes
    from train.core.preflight import preflight

    s = dict(sizes(False), image=32)  # the image size does not change the counts; small JPEGs are quicker
    cfg = bench_config(tmp_path, bench_data(tmp_path, s), s)
    assert cfg.data.global_batch_size == 256 and cfg.model.name == "ViT-B-32"
    preflight(cfg, world_size=1, device=False)
