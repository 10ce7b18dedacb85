"""The trainer's stateful components besides the DeepSpeed engine, each with ``state_dict()`` /
``load_state_dict()`` (torchtitan's ``Stateful`` protocol), so the checkpoint manager saves and loads
them all by name and no field is listed twice.

- ``TrainProgress``: the counters (step, samples seen, skipped samples, non-finite steps).
- ``RNGState``: this rank's torch / numpy / python (and CUDA) generators.
- ``StatefulLoader``: the data position. The sample order is a pure function of (seed, step, sources,
  manifest) (train/data/loader.py), so the position is the next step plus the order's fingerprint, which a
  resumed run must match.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from common.config_loader import ConfigError
from train.data import loader as data_lib


@dataclasses.dataclass
class TrainProgress:
    """How far the run is; what a resumed run continues from."""

    step: int = 0
    """Optimizer steps taken (a skipped non-finite step counts: its batch was consumed)."""
    samples_seen: int = 0
    """step x global batch."""
    skipped_samples: int = 0
    """Unreadable samples replaced by the loader, summed over ranks (up to the last step's sync)."""
    nonfinite_total: int = 0
    """Steps skipped for a NaN/inf loss."""
    nonfinite_in_row: int = 0
    """Consecutive such steps up to now (optim.max_nonfinite_steps of them abort the run)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


class RNGState:
    """The process-global generators of this rank. Saved per rank: ranks draw differently."""

    def state_dict(self) -> dict:
        kind, keys, *rest = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 # numpy's state holds an ndarray; as a list it loads under torch.load(weights_only=True)
                 "numpy": [kind, keys.tolist(), *rest]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class StatefulLoader:
    """This rank's batches from ``next_step`` to ``end_step``, resumable by ``state_dict``.

    The DataLoader (and its worker processes) is made when iteration starts, at the current position,
    and shut down by ``close()``. Each batch it yields moves the position past its step. ``pin_memory``: the
    batches' tensors come in page-locked memory (for a CUDA trainer; see ``build_loader``).
    """

    def __init__(self, data_cfg, rank: int, world_size: int, seed: int, end_step: int,
                 transform: Callable, tokenizer: Callable, pin_memory: bool = False):
        self.cfg, self.rank, self.world_size, self.seed, self.end_step = data_cfg, rank, world_size, seed, end_step
        self.transform, self.tokenizer, self.pin_memory = transform, tokenizer, pin_memory
        self.order = data_lib.make_data_order(data_lib.read_manifests(data_cfg), data_cfg, seed)
        self.next_step = 0
        self._iter: Optional[Iterator] = None

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.order.check_resume(state["order"])  # the checkpoint's order must be this run's order
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.next_step = int(state["next_step"])

    def __iter__(self) -> Iterator[dict]:
        self.close()
        loader = data_lib.build_loader(self.cfg, self.rank, self.world_size, self.seed, self.next_step,
                                       self.end_step, self.transform, self.tokenizer, self.pin_memory)
        self._iter = iter(loader)
        for batch in self._iter:
            self.next_step = int(batch["step"]) + 1
            yield batch

    def close(self) -> None:
        """Stop the DataLoader's worker processes (before the process group goes away)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            workers = list(getattr(self._iter, "_workers", []))
            shutdown()
            for worker in workers:  # they ignore SIGTERM (train/data/loader.py _worker_init): torch's terminate() fallback
                if worker.is_alive():  # would leave a stuck one behind
                    worker.kill()
        self._iter = None
