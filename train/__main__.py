"""`python -m train --config FILE [key=value ...]`: one training run under any launcher.

Exit codes: 0 done; 3 (common.jobs.EXIT_REQUEUE) stopped with a checkpoint, requeue me; 2 a user error
(bad config, missing dataset or checkpoint: one line on stderr, printed by rank 0 only, no traceback);
1 the run aborted (e.g. NaN losses: one line, why); anything else is a bug and shows its traceback.
"""
import os
import sys

from common.config_loader import ConfigError

EXIT_USER_ERROR, EXIT_ABORTED = 2, 1


def _rank() -> int:
    """This process's rank as the launcher set it, read before any process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def cli(argv: list) -> int:
    try:
        from train.core.trainer import main

        return main(argv)["exit_code"]
    except (ConfigError, FloatingPointError) as err:
        # Every rank meets the same mistake (the checks read the same files); one line says it.
        if _rank() == 0:
            kind = "config error" if isinstance(err, ConfigError) else "error"
            print(f"{kind}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR if isinstance(err, ConfigError) else EXIT_ABORTED
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
