"""W local ranks of ``python -m train``, started as torchrun would start them, without torchrun.

Each process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and one MASTER_PORT free on this machine
(train.core.distributed reads them; on CPU the ranks meet over gloo), runs from the repository root with it on
PYTHONPATH (prepended: an existing PYTHONPATH, such as the device machine's wheel folder, stays), and writes its
output to LOG_DIR/NAME.rank{R}.log. The benchmarks use it for the trainer's own runs; the tests' launcher
(tests/harness/rank_launcher.py) builds on it and adds fault injection.

    procs = launch_ranks(Path("logs"), "pretrain", 2, ["--config", "configs/pretrain_cyclip.yaml"])
    codes = wait_ranks(procs, timeout=600)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from common.net import free_port
from common.paths import REPO_ROOT

TRAIN_ENTRY = ("train",)
"""What follows ``python -m`` by default: the trainer's command line (train/__main__.py)."""


def pythonpath(root: Path = REPO_ROOT) -> str:
    """PYTHONPATH for a child process: ``root`` first, then whatever PYTHONPATH already holds (never replaced:
    packages installed with ``pip --target`` are found only through it)."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)


def rank_env(world: int, threads: int = 1, extra_env: Optional[Mapping[str, str]] = None) -> dict:
    """The environment the ranks share: os.environ, the rendezvous on a free local port, W, the thread count
    per process (OMP_NUM_THREADS: W processes must not each take every core), the repository prepended to
    PYTHONPATH and ``extra_env`` last."""
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                OMP_NUM_THREADS=str(threads), PYTHONPATH=pythonpath(), **(extra_env or {}))


def launch_ranks(log_dir: Path, name: str, world: int, args: Sequence[str], threads: int = 1,
                 extra_env: Optional[Mapping[str, str]] = None,
                 entry: Sequence[str] = TRAIN_ENTRY) -> list[subprocess.Popen]:
    """One ``python -m ENTRY ARGS`` process per rank (not waited for); rank R's stdout and stderr are
    appended to LOG_DIR/NAME.rank{R}.log."""
    env = rank_env(world, threads, extra_env)
    procs = []
    for rank in range(world):
        with open(Path(log_dir) / f"{name}.rank{rank}.log", "ab") as log:   # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, "-m", *entry, *args], cwd=REPO_ROOT, stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    return procs


def wait_ranks(procs: Sequence[subprocess.Popen], timeout: Optional[float] = None) -> list[int]:
    """Every rank's exit code. With ``timeout`` (seconds, per rank), ranks still running then are killed
    and the wait raises subprocess.TimeoutExpired; if the waiting itself is interrupted, too."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def log_tail(log_dir: Path, name: str, rank: int = 0, chars: int = 3000) -> str:
    """The end of rank ``rank``'s log, for an error message."""
    path = Path(log_dir) / f"{name}.rank{rank}.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no log at {path})"
