"""`python -m train --config FILE [key=value ...]`: one training run under any launcher.

Exit codes (common/errors.py): 0 done; 3 (EXIT_REQUEUE) stopped with a checkpoint, requeue me; 2 a user
error (bad config, missing dataset or checkpoint: one line on stderr, printed by rank 0 only, no traceback);
1 the run aborted (e.g. NaN losses: one line, why); anything else is a bug and shows its traceback.

A stop signal (SIGTERM, SIGUSR1) is answered with 3 from the first line of this file on: during start-up
(imports, DeepSpeed's op build, the rendezvous) the process has no step of its own to save, so it leaves at
once with 3 and the requeued job resumes from the last checkpoint; from the first step on the trainer's
StopPolicy takes over (checkpoint at the next step boundary, then 3). A second signal never turns that exit
into a kill (rc 143/138).
"""
# Installed before any heavy import: SLURM's USR1 or a preemption's TERM may come while torch, DeepSpeed or
# ninja are still loading/compiling, which takes from seconds to minutes on a fresh node.
import os
import signal
import sys

EXIT_REQUEUE = 3  # common.errors.EXIT_REQUEUE (checked by tests); not imported here to stay import-free
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _on_startup_signal(signum, _frame=None) -> None:
    # os._exit, not an exception: one raised inside torch's or DeepSpeed's import or C++ init leaves them
    # half-built (a segfault follows), and before the first step this process holds nothing to save.
    os.write(2, f"signal {int(signum)} during start-up: exiting with {EXIT_REQUEUE} (requeue me) before "
                f"training\n".encode())
    _write_exit_marker(EXIT_REQUEUE)
    os._exit(EXIT_REQUEUE)


def _write_exit_marker(code: int) -> None:
    """For ``python -m train.launch.torchrun``, which maps torchrun's failure back to 3 (see there): the file
    ``$TRAIN_EXIT_DIR/rank-<RANK>`` holds "<code> <world size>". No import: it also runs in a signal handler."""
    folder = os.environ.get("TRAIN_EXIT_DIR")
    if not folder:
        return
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        with open(os.path.join(folder, f"rank-{rank}"), "w") as marker:
            marker.write(f"{code} {world}\n")
    except OSError:
        pass  # the wrapper then keeps torchrun's own code: never fail the exit itself


def _install_startup_handler() -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _on_startup_signal)


def _ignore_further_signals() -> None:
    """After the decision to stop, later stop signals are only noted (the exit code is already decided)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda s, f: os.write(2, f"signal {int(s)} while exiting: ignored\n".encode()))


_install_startup_handler()


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(argv: list) -> int:
    from train.core.trainer import main

    return main(argv)["exit_code"]


def cli(argv: list) -> int:
    from common.cli import run_entry_point

    code = run_entry_point(_train, argv, on_exit=_teardown)
    _ignore_further_signals()
    _write_exit_marker(code)
    return code


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
