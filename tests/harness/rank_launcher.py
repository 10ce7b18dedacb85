"""Start `python -m train` as W real processes, as a launcher would (RANK/WORLD_SIZE/... per process).

Fault injection lives here, never in the trainer: ``python -m tests.harness.rank_launcher --kill-during-save-at STEP
-- ARGS`` is `python -m train ARGS` in a process whose checkpoint manager SIGKILLs the process right after
this rank wrote its part of the checkpoint of STEP (DeepSpeed shards + its rank state), before the commit.
``launch_ranks(..., kill_during_save_at=STEP)`` starts the ranks that way.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(log_dir: Path, name: str, world: int, args: list[str], extra_env: dict | None = None,
                 kill_during_save_at: int | None = None) -> list[subprocess.Popen]:
    """One `python -m train ARGS` process per rank; each rank's output goes to LOG_DIR/NAME.rank{R}.log."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), WORLD_SIZE=str(world), **(extra_env or {}))
    procs = []
    for rank in range(world):
        log = open(log_dir / f"{name}.rank{rank}.log", "ab")
        entry = ["train"] if kill_during_save_at is None else \
            ["tests.harness.rank_launcher", "--kill-during-save-at", str(kill_during_save_at), "--"]
        procs.append(subprocess.Popen([sys.executable, "-m", *entry, *args], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Every rank's exit code; ranks still running after `timeout` s are killed (and the wait raises)."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def kill_during_save(step: int) -> None:
    """Patch this process's CheckpointManager: SIGKILL itself once its part of checkpoint ``step`` is written."""
    import os
    import signal

    from train.core.checkpoint import CheckpointManager, step_tag

    write_partial = CheckpointManager._write_partial

    def write_then_die(self, partial: Path) -> None:
        write_partial(self, partial)
        if partial.name.endswith(step_tag(step)):
            os.kill(os.getpid(), signal.SIGKILL)

    CheckpointManager._write_partial = write_then_die


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.harness.rank_launcher")
    parser.add_argument("--kill-during-save-at", type=int, required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    kill_during_save(args.kill_during_save_at)
    from train.__main__ import cli

    return cli(args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
