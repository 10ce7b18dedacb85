"""Everything needed to resume, in one place: atomic sharded checkpoints of the engine and every stateful component.

Layout under RUN_DIR/checkpoints/::

    step_00000123/              one complete checkpoint (a DeepSpeed tag folder)
      mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed's shards (the engine)
      rank{R}_state.pt          rank R's per-rank components ({name: state_dict}, e.g. its RNG)
      trainer_state.pt          {step, world_size, config, code_version, states: {name: state_dict}} for
                                the components every rank shares (counters, data position, objective); rank 0
    step_00000123_universal/    made on demand for an elastic resume (different world size)
    latest                      the name of the newest *complete* checkpoint

The manager knows components only by name (``register``): a component is anything with ``state_dict()``
and ``load_state_dict()``, so adding one to the trainer's registry is all it takes to checkpoint it.

Atomicity: every rank writes into ``.partial_step_...``; after a barrier rank 0 renames it into place
and only then replaces ``latest`` (write to a temporary file + rename). A kill at any point leaves the
previous checkpoint and ``latest`` intact; stale partial folders are removed at the next start.
Requires a filesystem shared by all ranks (as DeepSpeed itself does).

With ``checkpoint.remote`` (train/core/remote_checkpoint.py) rank 0 also uploads each complete checkpoint in the
background, and run.resume=latest without a local checkpoint downloads the one the remote ``latest`` names.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Protocol

import torch
import torch.distributed as dist

from common.atomic_files import atomic_write_text
from common.errors import InputError
from common.paths import REPO_ROOT
from train.core.remote_checkpoint import RemoteCheckpoints

LATEST = "latest"
FRESH = ("", "none")  # run.resume values that start a run from scratch
TRAINER_STATE = "trainer_state.pt"
PARTIAL_PREFIX = ".partial_"
DISK_FULL_BYTES = 1 << 20  # a save that fails with less free than this ran out of space
RANK_STATE = "rank{}_state.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def code_version() -> str:
    root = REPO_ROOT
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class SaveSchedule:
    """When the trainer writes a checkpoint: every ``every_steps`` steps before the end, on an agreed stop,
    and at the end; never twice at one step (a stop right after a periodic save, or a run resumed at its
    checkpoint's step, writes nothing new).

    ``saved_at``: the step of the newest checkpoint this run holds (the resume step), or None (fresh)."""

    def __init__(self, every_steps: int, total_steps: int, saved_at: Optional[int] = None):
        self.every_steps, self.total_steps, self.saved_at = every_steps, total_steps, saved_at

    def periodic(self, step: int) -> bool:
        """A periodic save is due after optimizer step ``step`` (the final one is ``final``'s)."""
        return step % self.every_steps == 0 and step < self.total_steps and step != self.saved_at

    def final(self, step: int) -> bool:
        """A save is needed on a stop or at the end, unless one exists for ``step`` already."""
        return step != self.saved_at

    def saved(self, step: int) -> None:
        self.saved_at = step


class CheckpointManager:
    """Saves and loads the DeepSpeed engine plus named components (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int,
                 remote: Optional[RemoteCheckpoints] = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank
        self.remote = remote if rank == 0 else None  # rank 0 uploads and downloads (the run_dir is shared)
        self.engine = None
        self.states: Dict[str, Stateful] = {}
        self.rank_states: Dict[str, Stateful] = {}
        self.meta: dict = {}
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def register(self, engine, states: Dict[str, Stateful], rank_states: Dict[str, Stateful], meta: dict) -> None:
        """What to checkpoint: the engine (DeepSpeed's sharded format), components shared by all ranks
        (saved once, by rank 0), per-rank components, and ``meta`` (e.g. world size, config) saved beside."""
        self.engine, self.states, self.rank_states, self.meta = engine, states, rank_states, meta

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.dir.parent)

    def resolve(self, resume: str) -> Optional[Path]:
        """'' / 'none' -> None; 'latest' -> the newest complete checkpoint or None; else that folder (must exist).

        A fresh start ('' / 'none') removes this run folder's old checkpoints (rank 0): the run starts
        over, and a stale ``latest`` must never be resumed as this run's, nor old steps pruned against it.
        With a remote, 'latest' and no local checkpoint download the remote's latest first (rank 0; all wait)."""
        if resume.lower() in FRESH:
            if self.remote is not None:
                self.remote.start_over()
            if self.rank == 0 and any(self.dir.glob("step_*")):
                logging.getLogger("train").warning("run.resume=%s: starting over, removing the old checkpoints in %s",
                                                   resume or "''", self.dir)
                (self.dir / LATEST).unlink(missing_ok=True)
                for old in self.dir.glob("step_*"):
                    shutil.rmtree(old, ignore_errors=True)
            return None
        if resume == LATEST:
            if self.rank == 0 and self.remote is not None and self.latest() is None:
                self.remote.download_latest(self.dir, LATEST)
            _barrier()
            return self.latest()
        return complete_checkpoint(resume)

    # ---------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        partial = self.dir / (PARTIAL_PREFIX + step_tag(step))
        if self.rank == 0:
            self.wait_upload()  # the upload in flight reads a folder this save may prune
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        with self._disk_full_is_one_line(partial):
            self._write_partial(partial)
        _barrier()
        final = self.dir / step_tag(step)
        if self.rank == 0:
            with self._disk_full_is_one_line(partial):
                self._commit(partial, final, step)
            if self.remote is not None:
                self.remote.start_upload(final)
        _barrier()
        return final

    def wait_upload(self) -> None:
        """Wait for the background upload in flight, if any (the end of a run, a stop, the next save)."""
        if self.remote is not None:
            self.remote.wait()

    @contextlib.contextmanager
    def _disk_full_is_one_line(self, partial: Path):
        """A full disk during a save: the half-written folder removed, ``latest`` left as it was (it still names
        the last complete checkpoint), and one line (InputError) naming the folder, the space free and the
        space the last checkpoint took. torch.save reports ENOSPC as a RuntimeError, so the free space decides."""
        try:
            yield
        except Exception as err:
            free = shutil.disk_usage(self.dir).free
            if not (isinstance(err, OSError) and err.errno == errno.ENOSPC) and free >= DISK_FULL_BYTES:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            last = latest_checkpoint(self.dir.parent)
            needed = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) if last is not None else 0
            raise InputError(f"no space left in {self.dir} while saving {partial.name.removeprefix(PARTIAL_PREFIX)} "
                             f"({free / 2**20:.0f} MiB free; " +
                             (f"a checkpoint takes about {needed / 2**20:.0f} MiB per save; {LATEST} still names "
                              f"{last.name}" if last is not None else "no checkpoint was saved yet") +
                             "): free space there, lower checkpoint.keep_last, or move run.run_dir") from None

    def _write_partial(self, partial: Path) -> None:
        """Every rank: its DeepSpeed shards and its per-rank components."""
        self.engine.save_checkpoint(str(self.dir), tag=partial.name, client_state={}, save_latest=False)
        torch.save({name: c.state_dict() for name, c in self.rank_states.items()},
                   partial / RANK_STATE.format(self.rank))

    def _commit(self, partial: Path, final: Path, step: int) -> None:
        """Rank 0: the shared components, then the rename and ``latest`` that make the checkpoint count."""
        state = {**self.meta, "step": step, "code_version": code_version(),
                 "states": {name: c.state_dict() for name, c in self.states.items()}}
        # trainer_state.pt goes in last: resolve() treats its presence as "complete".
        torch.save(state, partial / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        atomic_write_text(self.dir / LATEST, final.name)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
        for old in complete[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, path: Path) -> dict:
        """Load the engine and every registered component from ``path``; returns the saved trainer state.

        A per-rank file absent for this rank (it did not exist in the saved run: elastic resume) leaves
        that rank's per-rank components as they are."""
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        state = self.load_trainer_state(path)
        missing = sorted(set(self.states) - set(state.get("states", {})))
        if missing:  # a user error (run.resume names it): one line from python -m train
            raise InputError(f"{path / TRAINER_STATE} has no state for {', '.join(missing)}: not a checkpoint "
                              "of this trainer version; resume it with the version that wrote it")
        for name, component in self.states.items():
            component.load_state_dict(state["states"][name])
        rank_file = path / RANK_STATE.format(self.rank)
        if rank_file.is_file():
            saved = torch.load(rank_file, map_location="cpu", weights_only=True)
            for name, component in self.rank_states.items():
                if name in saved:
                    component.load_state_dict(saved[name])
        return state

    @staticmethod
    def load_trainer_state(path: Path) -> dict:
        """The small rank-0 file: step, world_size, config, code_version and the shared components' states."""
        return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)


STEP_FOLDER = re.compile(r"^step_\d+$")  # step_tag's names (not .partial_*, not *_universal)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """RUN_DIR's newest complete checkpoint: the one ``checkpoints/latest`` names, or None when there is none.

    When the pointer is missing, empty, damaged or names a folder that is gone or incomplete (deleted by hand,
    a disk cleaned up), the newest complete ``step_*`` folder is taken instead, with a warning: a resume never
    falls back to step 0 over checkpoints that exist. InputError (one line) when the pointer names a checkpoint
    that is gone and no other complete one is left, since starting over would then be silent."""
    folder = Path(run_dir) / "checkpoints"
    marker = folder / LATEST
    named = marker.read_text(errors="replace").strip() if marker.is_file() else None
    if named and STEP_FOLDER.match(named) and (folder / named / TRAINER_STATE).is_file():
        return folder / named
    complete = sorted(p for p in folder.glob("step_*") if STEP_FOLDER.match(p.name) and (p / TRAINER_STATE).is_file())
    if complete:
        said = "is missing" if named is None else f"names {named!r}, which is gone or incomplete"
        logging.getLogger("train").warning("%s %s: resuming from the newest complete checkpoint, %s", marker, said,
                                           complete[-1].name)
        return complete[-1]
    if named is not None:
        raise InputError(f"run.resume=latest: {marker} names {named!r}, which is gone or incomplete, and {folder} "
                         "holds no other complete checkpoint: restore it, or start over with run.resume=none")
    return None


def complete_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete checkpoint folder, else FileNotFoundError saying what it is not."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run.resume={path}: no such checkpoint folder")
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"run.resume={path}: no {TRAINER_STATE} there, not a complete checkpoint "
                                "(a run folder resumes with run.resume=latest and run.run_dir=it)")
    return path


def to_universal(checkpoint: Path, rank: int = 0) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 converts, all wait).

    The universal folder sits beside the original as ``<tag>_universal`` and is loaded with
    ``"checkpoint": {"load_universal": true}``; it is what lets a run continue on another world size.
    """
    checkpoint = Path(checkpoint)
    out = checkpoint.with_name(checkpoint.name + "_universal")
    if rank == 0 and not (out / TRAINER_STATE).is_file():
        tmp = checkpoint.with_name(PARTIAL_PREFIX + out.name)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(checkpoint), "--output_folder", str(tmp), "--inject_missing_state",
                        "--num_extract_workers", "1", "--num_merge_workers", "1"], check=True)
        for extra in [TRAINER_STATE, *(p.name for p in checkpoint.glob(RANK_STATE.format("*")))]:
            shutil.copy2(checkpoint / extra, tmp / extra)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
