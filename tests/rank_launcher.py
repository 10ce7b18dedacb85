"""Start `python -m train` as W real processes, as a launcher would (RANK/WORLD_SIZE/... per process)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(log_dir: Path, name: str, world: int, args: list[str],
                 extra_env: dict | None = None) -> list[subprocess.Popen]:
    """One `python -m train ARGS` process per rank; each rank's output goes to LOG_DIR/NAME.rank{R}.log."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), WORLD_SIZE=str(world), **(extra_env or {}))
    procs = []
    for rank in range(world):
        log = open(log_dir / f"{name}.rank{rank}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=log,
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
