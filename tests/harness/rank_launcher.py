"""The tests' rank launcher: train.launch.local (W local ranks of `python -m train`) plus fault injection.

Fault injection lives here, never in the trainer: ``python -m tests.harness.rank_launcher --kill-during-save-at STEP
-- ARGS`` is `python -m train ARGS` in a process whose checkpoint manager SIGKILLs the process right after
this rank wrote its part of the checkpoint of STEP (DeepSpeed shards + its rank state), before the commit.
``launch_ranks(..., kill_during_save_at=STEP)`` starts the ranks that way.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from common.net import free_port  # noqa: F401 (tests import it from here)
from common.paths import REPO_ROOT
from train.launch import local
from train.launch.local import wait_ranks  # noqa: F401 (the tests' import site)

ROOT = REPO_ROOT


def launch_ranks(log_dir: Path, name: str, world: int, args: list[str], extra_env: dict | None = None,
                 kill_during_save_at: int | None = None) -> list[subprocess.Popen]:
    """One `python -m train ARGS` process per rank (train.launch.local.launch_ranks, 1 thread each); each rank's
    output goes to LOG_DIR/NAME.rank{R}.log. With ``kill_during_save_at``, every rank dies mid-save at that step."""
    entry = local.TRAIN_ENTRY if kill_during_save_at is None else \
        ("tests.harness.rank_launcher", "--kill-during-save-at", str(kill_during_save_at), "--")
    return local.launch_ranks(log_dir, name, world, args, extra_env=extra_env, entry=entry)


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
