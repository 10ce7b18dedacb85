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
from common.net import free_port
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


# ----------------------------------------------------------------------------- row 14
def run_train(data: Path, tmp_path: Path, *extra: str, dry_run: bool = False, timeout: float = 90, **env_extra):
    cmd = [sys.executable, "-m", "train", *(["--dry-run"] if dry_run else []), "--config", CONFIG,
           *train_args(data, tmp_path / "run", *extra)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=tmp_path, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - t0


def assert_one_line(done, *needles: str) -> str:
    assert done.returncode == EXIT_USER_ERROR, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_cuda_without_a_gpu_is_one_line_before_deepspeed(digits, tmp_path, dry_run):
    done, took = run_train(digits, tmp_path, "run.device=cuda", dry_run=dry_run, CUDA_VISIBLE_DEVICES="")
    assert_one_line(done, "run.device=cuda", "0 CUDA GPU(s) visible")
    assert took < 30 and "rendezvous" not in done.stderr   # refused in the preflight, before any process group


def test_cuda_for_a_local_rank_beyond_the_gpus_is_one_line(digits, tmp_path):
    """Own input: local rank 3 (as on a 4-GPU node) where fewer GPUs are visible (here none): the local rank is named."""
    done, _ = run_train(digits, tmp_path, "run.device=cuda", dry_run=True, RANK="0", WORLD_SIZE="2", LOCAL_RANK="3")
    assert_one_line(done, "local rank 3 needs GPU 3")


def test_stale_world_size_with_no_peer_gives_up_within_the_timeout(digits, tmp_path):
    port = free_port()
    done, took = run_train(digits, tmp_path, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), RENDEZVOUS_TIMEOUT_S="3")
    assert_one_line(done, "rank 0 of 2", f"127.0.0.1:{port}", "within 3 s", "stale WORLD_SIZE")
    assert f"rank 0 waits up to 3 s (RENDEZVOUS_TIMEOUT_S) for all 2 ranks at 127.0.0.1:{port}" in done.stderr
    assert took < 60, took   # torch's default is 1,800 s of silence


def test_busy_master_port_is_one_line(digits, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done, took = run_train(digits, tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert_one_line(done, f"127.0.0.1:{port}", "MASTER_PORT is already in use")
    assert took < 60, took


def test_unresolvable_master_addr_is_one_line(monkeypatch):
    """Own input: a worker rank whose MASTER_ADDR names no host (in-process: refused before any process group)."""
    from common.errors import ConfigError
    from train.core.distributed import init_distributed_from_env

    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="no-such-host.invalid",
                           MASTER_PORT="29555").items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        init_distributed_from_env(timeout_s=3, device="cpu")
    message = str(err.value)
    assert "\n" not in message and "rank 1 of 2 at no-such-host.invalid:29555" in message, message
    assert "MASTER_ADDR does not resolve" in message, message
    assert time.monotonic() - t0 < 3   # resolved up front, not retried until the timeout


@pytest.mark.parametrize("raw,want", [("", 180), ("7", 7), ("soon", None), ("0", None), ("-5", None)])
def test_rendezvous_timeout_is_a_positive_whole_number(monkeypatch, raw, want):
    from common.errors import ConfigError
    from train.core.distributed import rendezvous_timeout_s

    monkeypatch.setenv("RENDEZVOUS_TIMEOUT_S", raw)
    if want is None:
        with pytest.raises(ConfigError, match="RENDEZVOUS_TIMEOUT_S"):
            rendezvous_timeout_s()
    else:
        assert rendezvous_timeout_s() == want


# ----------------------------------------------------------------------------- row 13
def torchrun_cmd(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.launch.torchrun", "--nproc-per-node=2", "--master-port", str(free_port()),
            "-m", "train", "--config", CONFIG, *train_args(data, run_dir, "optim.steps=30", *extra)]


def latest_step(run_dir: Path) -> int:
    checkpoints = run_dir / "checkpoints"
    return int((checkpoints / "latest").read_text().strip().split("_")[1])


def test_torchrun_wrapper_keeps_exit_3_of_stop_after_steps(digits, tmp_path):
    """The row: 2 real ranks under torchrun, run.stop_after_steps=1 -> torchrun alone exits 1; the wrapper 3."""
    done = subprocess.run(torchrun_cmd(digits, tmp_path / "run", "run.stop_after_steps=1"), cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == EXIT_REQUEUE, done.stderr[-3000:]
    assert "every rank stopped with a checkpoint: exit 3" in done.stderr
    assert latest_step(tmp_path / "run") == 1   # the independent reference: the stop checkpoint is there


def test_torchrun_wrapper_keeps_torchruns_code_when_a_rank_fails(digits, tmp_path):
    """Own input of the kind: a real failure (a user error on every rank) is not turned into a requeue."""
    done = subprocess.run(torchrun_cmd(digits, tmp_path / "run", "model.name=no-such-model"), cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode not in (0, EXIT_REQUEUE), done.stderr[-3000:]
    assert "every rank stopped" not in done.stderr
