"""The trainer's decisions, each a small object the loop asks: skip or abort on a non-finite loss, stop on a
signal, and the collectives by which every rank reaches the same answer.

(When to save lives with the checkpoints: ``train.core.checkpoint.SaveSchedule``.) Each is testable alone,
without a model, data or DeepSpeed (tests/train/core/test_policies.py).
"""
from __future__ import annotations

import logging
import signal
from typing import Dict, Tuple

import torch
import torch.distributed as dist

from common.errors import EXIT_REQUEUE
from train.core.state import TrainProgress

log = logging.getLogger("train")


class RankAgreement:
    """The collectives that make every rank take the same decision, on the trainer's device.

    Every tensor a collective touches lives on ``device``: NCCL (DeepSpeed's backend on CUDA) rejects CPU
    tensors. Each call is one all-reduce and one device-to-host copy; in a single process (no group) the
    local values are the answer."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(values, op=op)
        return values

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when ``loss`` is finite on every rank (agreed before any backward, or collectives would hang
        on the ranks that skip). isfinite stays on the device: one sync, after the reduce."""
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1).to(self.device)
        return self._reduce(bad, dist.ReduceOp.MAX).item() == 0.0

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on some rank (a signal to any rank stops all of them together)."""
        return self._reduce(torch.tensor([1.0 if flag else 0.0], device=self.device), dist.ReduceOp.MAX).item() > 0

    def mean_and_total(self, terms: Dict[str, torch.Tensor], count: int) -> Tuple[Dict[str, float], int]:
        """(the mean over ranks of each 0-d term, the sum over ranks of ``count``) in one all-reduce.

        The loss terms are rank shares that average to the global-batch value (docs/METHODS.md §6)."""
        names = sorted(terms)
        values = torch.stack([terms[n].float().reshape(()).to(self.device) for n in names]
                             + [torch.tensor(float(count), device=self.device)])
        values = self._reduce(values).tolist()  # one device-to-host copy for all terms
        return ({n: v / self.world_size for n, v in zip(names, values[:-1])}, int(round(values[-1])))


class NonFinitePolicy:
    """A step whose loss is NaN/inf on some rank is skipped (no backward, no update) and counted;
    ``max_in_row`` of them in a row abort the run (``optim.max_nonfinite_steps``)."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row

    def record(self, progress: TrainProgress, finite: bool) -> None:
        """Count the step that just ended (``progress.step`` already advanced) in ``progress``.

        Raises FloatingPointError (the run aborts with one line, exit 1) at ``max_in_row`` in a row."""
        if finite:
            progress.nonfinite_in_row = 0
            return
        progress.nonfinite_total += 1
        progress.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss, step skipped (%d in a row)", progress.step, progress.nonfinite_in_row)
        if progress.nonfinite_in_row >= self.max_in_row:
            raise FloatingPointError(
                f"{progress.nonfinite_in_row} consecutive steps had a NaN/inf loss (last at step {progress.step}); "
                "aborting. Lower optim.lr, check the data, or resume from an earlier checkpoint.")


class StopPolicy:
    """Stop early, with a checkpoint and EXIT_REQUEUE: on SIGUSR1 (SLURM's time-limit warning) or SIGTERM
    (preemption), or after ``stop_after_steps`` steps of this process (0 = never), as a time-limited job would.
    The wish is local; the trainer makes every rank agree (``RankAgreement.any``) at a step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_after_steps: int):
        self.stop_after_steps = stop_after_steps
        self.signalled = False

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, _frame=None) -> None:
        log.warning("signal %d: will checkpoint and exit with %d at the next step boundary", signum, EXIT_REQUEUE)
        self.signalled = True

    def wants_stop(self, steps_this_process: int) -> bool:
        limit = self.stop_after_steps
        return self.signalled or bool(limit and steps_this_process >= limit)
