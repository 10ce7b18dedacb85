"""One training per run folder: rank 0 holds an exclusive POSIX record lock (``fcntl.lockf``) on
``RUN_DIR/.run.lock`` for the run's life.

Two commands started on one run folder would otherwise both resume, save and prune the same checkpoints (one
loads a folder the other then deletes). The kernel drops the lock when its process ends, kill -9 included, so a
lock left by a dead run never blocks the next one. A record lock, not ``flock``: a flock belongs to the open file,
which forked children (DataLoader workers) share, so after kill -9 of rank 0 its orphaned workers kept the folder
locked until they noticed; a record lock belongs to the process alone and is never inherited by ``fork``. (It is
also dropped when the holder closes any descriptor of the file, so nothing else here opens it.) The file names
its holder (pid and host) for the refusal. Own code (a few lines of fcntl) rather than the ``filelock`` package
(which uses flock): the message needs the holder, and the lock must not outlive its process.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Dict, TextIO

from common.errors import InputError

LOCK_NAME = ".run.lock"
_held: Dict[str, TextIO] = {}  # resolved lock path -> the open file holding the lock (this process)


def hold_run_lock(run_dir: str | os.PathLike) -> None:
    """Take RUN_DIR's lock for this process (again: a no-op). InputError (one line, naming the holder) when a
    live process holds it. A filesystem without locks only gets a warning: the run goes on unguarded."""
    path = Path(run_dir).resolve() / LOCK_NAME
    if str(path) in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, as the platform reports a held lock
        f.seek(0)
        holder = " ".join(f.read().split()) or "another process"
        f.close()
        raise InputError(f"run.run_dir={run_dir} is in use by {holder}: one training per run folder; wait for it "
                         "to end or stop it, or use another run.run_dir") from None
    except OSError as err:
        f.close()
        logging.getLogger("train").warning("run.run_dir=%s cannot be locked (%s): nothing stops a second training "
                                           "in it", run_dir, err)
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[str(path)] = f


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Let RUN_DIR's lock go (closing the file releases the record lock); a no-op when this process holds none."""
    f = _held.pop(str(Path(run_dir).resolve() / LOCK_NAME), None)
    if f is not None:
        f.close()
