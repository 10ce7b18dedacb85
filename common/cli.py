"""The one entry-point wrapper: a user mistake ends in one line on stderr and its exit code, never a traceback.

Every ``python -m`` entry point of the project (``train``, ``train.evaluate``, ``train.export``,
``train.launch``, ``pipeline``, the experiments, ``benchmarks.gpu_check``) returns
``run_entry_point(main, argv)``.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Sequence, Tuple, Type

from common.errors import EXIT_ABORTED, EXIT_OK, EXIT_USER_ERROR, UserError


def launcher_rank() -> int:
    """This process's rank as the launcher set it (RANK, else SLURM_PROCID, else 0), read before any
    process group exists, so that a mistake every rank meets is printed once."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def run_entry_point(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
                    *, user_errors: Tuple[Type[BaseException], ...] = (), debug: bool = False, hint: str = "",
                    on_exit: Optional[Callable[[], None]] = None) -> int:
    """``main(argv)``'s exit code (None counts as ``EXIT_OK``).

    A ``UserError`` (or one of ``user_errors``, e.g. the OS errors of a path the user gave) → one line
    ``{label}: {message}{hint}`` on stderr, printed by rank 0 only, and ``EXIT_USER_ERROR``; with ``debug``
    the traceback first. ``FloatingPointError`` (a run aborted on NaN losses) → ``error: ...`` and
    ``EXIT_ABORTED``. ``on_exit`` runs on every path (e.g. the trainer's process-group teardown).
    """
    try:
        return main(argv) or EXIT_OK
    except (UserError, FloatingPointError, *user_errors) as err:
        if debug:
            traceback.print_exc()
        if launcher_rank() == 0:
            label = getattr(err, "label", "error")
            print(f"{label}: {one_line(err)}{'' if debug else hint}", file=sys.stderr, flush=True)
        return EXIT_ABORTED if isinstance(err, FloatingPointError) else EXIT_USER_ERROR
    finally:
        if on_exit is not None:
            on_exit()
