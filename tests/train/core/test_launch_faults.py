"""Signals and launchers at the wrong moment (issue 23, rows 11-14), with real processes.

Row 11: a stop signal (SIGTERM, SIGUSR1) during start-up exits 3 (requeue me) at once, without training;
a second signal 0.6 s later does not turn that exit into a kill (143/138, what the default action gives).
Row 13: ``python -m train.launch.torchrun`` keeps exit 3 through a real 2-rank torchrun.
Row 14: launcher mistakes (busy MASTER_PORT, stale WORLD_SIZE with no peer, a device that is not there)
end in one line, quickly; the rendezvous wait is bounded by run.rendezvous_timeout_s.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import EXIT_REQUEUE, EXIT_USER_ERROR
from common.paths import REPO_ROOT
from tests.harness.data_fixtures import make_digits_dataset

CONFIG = str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("digits"), n_train=64, n_val=16, shard_size=32)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"run.run_dir={run_dir}", "data.global_batch_size=16", "data.num_workers=0",
            "optim.steps=4", "optim.warmup_steps=1", "checkpoint.export=false", "logging.progress_bar=false",
            "logging.tensorboard=false", *extra]


def env(**extra: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(clean, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **extra)


# ----------------------------------------------------------------------------- row 11
@pytest.mark.parametrize("first,second,delay_s", [
    (signal.SIGTERM, signal.SIGTERM, 0.3),      # the row: TERM twice 0.6 s apart, while torch imports
    (signal.SIGUSR1, signal.SIGTERM, 0.3),      # own: SLURM's warning, then the preemption's TERM
    (signal.SIGUSR1, signal.SIGUSR1, 0.15),     # own: while the first project imports run
], ids=["TERM-TERM", "USR1-TERM", "USR1-USR1-at-once"])
def test_stop_signal_during_startup_exits_3_and_a_second_is_not_a_kill(digits, tmp_path, first, second, delay_s):
    cmd = [sys.executable, "-m", "train", "--config", CONFIG, *train_args(digits, tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(delay_s)
        proc.send_signal(first)
        time.sleep(0.6)
        if proc.poll() is None:
            proc.send_signal(second)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert proc.returncode == EXIT_REQUEUE, text[-3000:]   # a kill reads -15 / -10 here (143 / 138 in a shell)
    assert "Traceback" not in text, text[-3000:]
    assert f"signal {int(first)} during start-up: exiting with 3" in text, text[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()    # nothing trained, nothing half-saved
