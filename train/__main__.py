"""`python -m train --config FILE [key=value ...]`: one training run under any launcher.

Exit codes (common/errors.py): 0 done; 3 (EXIT_REQUEUE) stopped with a checkpoint, requeue me; 2 a user
error (bad config, missing dataset or checkpoint: one line on stderr, printed by rank 0 only, no traceback);
1 the run aborted (e.g. NaN losses: one line, why); anything else is a bug and shows its traceback.
"""
import sys

from common.cli import run_entry_point


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(argv: list) -> int:
    from train.core.trainer import main

    return main(argv)["exit_code"]


def cli(argv: list) -> int:
    return run_entry_point(_train, argv, on_exit=_teardown)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
