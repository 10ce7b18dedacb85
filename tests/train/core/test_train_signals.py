"""A stop signal to the whole process group (SLURM preemption, scancel, torchrun, Ctrl-C's terminal group)
checkpoints at the next step boundary and exits 3 (common.jobs.EXIT_REQUEUE), DataLoader workers included.

Real processes: one `python -m train` with data.num_workers=1 in its own session, signalled with
os.killpg as SLURM signals a job step. Before the fix the signal killed the worker and the stop
checkpoint failed ("DataLoader worker ... killed by signal: Terminated", exit 1, no checkpoint).
The reference for "resumes and finishes" is the run's own step count: the rerun's metrics end at optim.steps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.jobs import EXIT_REQUEUE
from tests.harness.data_fixtures import make_digits_dataset
from common.paths import REPO_ROOT

pytestmark = pytest.mark.slow
ROOT = REPO_ROOT
STEPS = 30


def train_args(data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "pretrain_cyclip.yaml"),
            f"data.path={data}", f"run.run_dir={run_dir}", "data.global_batch_size=16", "data.num_workers=1",
            f"optim.steps={STEPS}", "optim.warmup_steps=2", "checkpoint.every_steps=1000", "checkpoint.export=false",
            "logging.progress_bar=false", "logging.tensorboard=false", "run.resume=latest"]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(clean, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_to_the_process_group_checkpoints_and_exits_3(tmp_path, signum):
    data = make_digits_dataset(tmp_path / "digits", n_train=128, n_val=16, shard_size=32)
    run_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(train_args(data, run_dir), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not logged_steps(run_dir):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step logged within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # the trainer and its DataLoader worker, as scancel / preemption do
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == EXIT_REQUEUE, output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-3000:]
    assert output.count(f"signal {int(signum)}: will checkpoint") == 1, output[-3000:]  # the trainer only
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (latest / "trainer_state.pt").is_file() and any(latest.glob("*model_states.pt")), sorted(latest.iterdir())
    stopped_at = int(latest.name.split("_")[1])
    assert 1 <= stopped_at < STEPS and stopped_at >= max(logged_steps(run_dir))
    assert not list(checkpoints.glob(".partial_*"))

    rerun = subprocess.run(train_args(data, run_dir), cwd=tmp_path, capture_output=True, text=True, timeout=400,
                           env=env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {latest} at step {stopped_at}" in rerun.stderr, rerun.stderr[-3000:]
    steps = logged_steps(run_dir)
    assert steps[-1] == STEPS and steps[-(STEPS - stopped_at):] == list(range(stopped_at + 1, STEPS + 1))
