"""The launcher contract between the trainer and whatever starts it (slurm/*.sh, train.launch.executor, train.experiments.demo.run).

Three facts, written once here and read by the shell scripts through ``python -m common.jobs``:

- ``EXIT_REQUEUE``: the trainer's exit code after it saved a checkpoint on a stop signal (SLURM's
  time-limit warning, preemption). The launcher requeues the job on this code and only on it.
- The resume rule: a run always continues from its own latest checkpoint (``run.resume=latest``). On the
  first start the user's overrides come after it, so a user who names a checkpoint to start from wins;
  after a requeue it comes last, so the restarted job continues its own run instead of starting over.
- ``LAUNCHER_VARS``: inside a SLURM or submitit job, the ranks and the rendezvous come from the job
  (train.core.distributed.discover_launcher_env); these variables, copied from the submitting shell by sbatch
  or by submitit's local executor, are stale there and are removed before the trainer starts.

CLI (for shell scripts; arguments and output are NUL-safe)::

    python -m common.jobs exit-requeue                          # prints 3
    python -m common.jobs train-args RESTARTS [key=value ...]   # prints the overrides, one per NUL
    python -m common.jobs launcher-vars                         # prints RANK WORLD_SIZE ...
"""
from __future__ import annotations

import sys
from typing import Iterable, List

from common.errors import EXIT_REQUEUE  # noqa: E402  (written once, in common/errors.py)
RESUME_LATEST = "run.resume=latest"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
USAGE = "usage: python -m common.jobs exit-requeue | launcher-vars | train-args RESTARTS [key=value ...]"


def resume_overrides(overrides: Iterable[str], restarted: bool) -> List[str]:
    """The trainer's ``key=value`` overrides with the resume rule applied (see the module docstring).

    ``restarted``: True after a requeue (SLURM_RESTART_COUNT > 0, a submitit checkpoint) and for drivers
    that always continue their own run (train.experiments.demo.run). Any ``run.resume=latest`` already in ``overrides`` is
    dropped first, so applying the rule twice changes nothing.
    """
    rest = [o for o in overrides if o != RESUME_LATEST]
    return [*rest, RESUME_LATEST] if restarted else [RESUME_LATEST, *rest]


def main(argv: List[str]) -> int:
    if argv == ["exit-requeue"]:
        print(EXIT_REQUEUE)
        return 0
    if argv == ["launcher-vars"]:
        print(" ".join(LAUNCHER_VARS))
        return 0
    if argv[:1] == ["train-args"] and len(argv) >= 2 and argv[1].isdigit():
        sys.stdout.write("".join(f"{o}\0" for o in resume_overrides(argv[2:], restarted=int(argv[1]) > 0)))
        return 0
    print(USAGE, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
