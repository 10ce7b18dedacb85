"""The trainer's decisions, each a small object the loop asks: skip or abort on a non-finite loss, stop on a
signal, and the collectives by which every rank reaches the same answer.

(When to save lives with the checkpoints: ``train.core.checkpoint.SaveSchedule``.) Each is testable alone,
without a model, data or DeepSpeed (tests/train/core/test_policies.py).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Dict

import torch
import torch.distributed as dist

from common.errors import EXIT_REQUEUE
from train.core.state import TrainProgress

log = logging.getLogger("train")


class RankAgreement:
    """The collectives that make every rank take the same decision, on the trainer's device.

    Every tensor a collective touches lives on ``device``: NCCL (DeepSpeed's backend on CUDA) rejects CPU
    tensors. Each call is one all-reduce and one device-to-host copy; in a single process (no group) the
    local values are the answer. ``step_sync`` is a training step's only one (docs/TRAINING.md, host syncs);
    ``any`` serves the decisions taken outside the step (an evaluation set that fails to open)."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(values, op=op)
        return values

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on some rank (a signal to any rank stops all of them together)."""
        return self._reduce(torch.tensor([1.0 if flag else 0.0], device=self.device), dist.ReduceOp.MAX).item() > 0

    def step_sync(self, terms: Dict[str, torch.Tensor], stop: bool, skipped: int) -> "StepAgreement":
        """Everything the ranks must agree on at a training step, in one all-reduce and one device-to-host copy.

        ``terms``: this rank's detached 0-d loss terms (on ``device``; "loss" among them); ``stop``: this rank
        wants to stop; ``skipped``: samples this rank's loader replaced since the last call. One float32 vector
        [terms in name order..., loss not finite (0/1), stop (0/1), skipped] is summed over ranks and read back
        with one ``tolist()``: that copy is the step's only host sync (it waits for the forward). The host values
        enter through ``torch.full`` (a fill kernel with the value as its argument, no blocking host-to-device
        copy); the loss terms are rank shares that average to the global-batch value (docs/METHODS.md §6).
        Float32 counts are exact up to 2**24 samples skipped in one step."""
        names = sorted(terms)
        local = [terms[n].detach().float().reshape(()).to(self.device) for n in names]
        bad = (~torch.isfinite(terms["loss"].detach().float())).float().reshape(()).to(self.device)
        flags = [torch.full((), float(stop), device=self.device), torch.full((), float(skipped), device=self.device)]
        values = self._reduce(torch.stack(local + [bad] + flags)).tolist()  # the one device-to-host copy
        *sums, bad_sum, stop_sum, skipped_sum = values
        return StepAgreement(finite=bad_sum == 0.0, stop=stop_sum > 0.0, skipped=int(round(skipped_sum)),
                             terms={n: v / self.world_size for n, v in zip(names, sums)})


@dataclasses.dataclass
class StepAgreement:
    """What every rank agreed on at a step's sync (``RankAgreement.step_sync``)."""

    finite: bool
    """The loss is finite on every rank (else every rank skips the step's backward and update)."""
    stop: bool
    """Some rank wants to stop (a signal, ``run.stop_after_steps``): every rank stops after this step."""
    skipped: int
    """Samples replaced by the loaders of all ranks since the previous sync."""
    terms: Dict[str, float]
    """Each loss term (and "logit_scale") averaged over ranks: the global-batch value (meaningless when not
    ``finite``)."""


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
    The wish is local; the trainer sends it with the step's sync (``RankAgreement.step_sync``), so every rank
    stops after the same step: a signal that arrives after a step's sync is acted on one step later."""

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
