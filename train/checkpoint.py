"""Everything needed to resume, in one place: atomic sharded checkpoints with the trainer state.

Layout under RUN_DIR/checkpoints/::

    step_00000123/              one complete checkpoint (a DeepSpeed tag folder)
      mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed's shards
      trainer_state.pt          step, samples seen, skip counters, lambda-sampler state, world size,
                                config, code version (rank 0)
      rng_rank{R}.pt            torch / numpy / python RNG states of rank R
    step_00000123_universal/    made on demand for an elastic resume (different world size)
    latest                      the name of the newest *complete* checkpoint

Atomicity: every rank writes into ``.partial_step_...``; after a barrier rank 0 renames it into place
and only then replaces ``latest`` (write to a temporary file + rename). A kill at any point leaves the
previous checkpoint and ``latest`` intact; stale partial folders are removed at the next start.
Requires a filesystem shared by all ranks (as DeepSpeed itself does).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from common.atomic_files import atomic_write_text

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
PARTIAL_PREFIX = ".partial_"
# Fault injection for the kill-during-save test: the process SIGKILLs itself mid-save at this step.
KILL_DURING_SAVE_ENV = "TRAIN_FAULT_KILL_DURING_SAVE_AT_STEP"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             # numpy's state holds an ndarray; as a list it loads under torch.load(weights_only=True)
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        marker = self.dir / LATEST
        if not marker.is_file():
            return None
        path = self.dir / marker.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None

    def resolve(self, resume: str) -> Optional[Path]:
        """'' -> None; 'latest' -> the newest complete checkpoint or None; else that folder (must exist)."""
        if not resume:
            return None
        if resume == LATEST:
            return self.latest()
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"run.resume={resume}: no {TRAINER_STATE} there, not a complete checkpoint")
        return path

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag = step_tag(step)
        partial = self.dir / (PARTIAL_PREFIX + tag)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=partial.name, client_state={}, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.rank}.pt")
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()
        final = self.dir / tag
        if self.rank == 0:
            # trainer_state.pt goes in last: resolve() treats its presence as "complete".
            torch.save(trainer_state, partial / TRAINER_STATE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
        for old in complete[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)

    @staticmethod
    def load_trainer_state(path: Path) -> dict:
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)

    @staticmethod
    def load_rng(path: Path, rank: int) -> Optional[dict]:
        file = path / f"rng_rank{rank}.pt"
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


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
        for extra in [TRAINER_STATE, *(p.name for p in checkpoint.glob("rng_rank*.pt"))]:
            shutil.copy2(checkpoint / extra, tmp / extra)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
