"""The trainer's loop without DeepSpeed, loaders or checkpoints: one process, batches held in memory.

For the experiments that train many small models (the study, tests): each step is the trainer's own
``ContrastiveStep`` (forward, ``ContrastiveObjective``, backward, the logit-scale clamp), learning rate from
``cosine_lr`` and the update from ``build_optimizer`` + ``plain_optimizer_step``, all configured by the
trainer's schemas (``OptimConfig``, ``LossConfig``). So a change to the trainer's step, loss, schedule or
optimizer reaches these runs too; only the engine (DeepSpeed) and the data path (shards) are left out.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from train.config import LossConfig, OptimConfig
from train.core import schedule
from train.core.engine import build_optimizer
from train.core.step import ContrastiveStep, plain_optimizer_step
from train.losses.objective import ContrastiveObjective


def epoch_batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices (``batch`` long tensors, endless) into n in-memory samples: a fresh permutation of
    range(n) per epoch from a ``torch.Generator`` seeded with ``seed``, the incomplete tail of an epoch
    dropped (every step sees a full batch of negatives, as with the trainer's fixed global batch)."""
    if not 0 < batch <= n:
        raise ValueError(f"batch {batch} must be in 1..{n} (the samples held)")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def train_in_process(model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                     optim: OptimConfig, loss: LossConfig, seed: int, accum_freq: int = 1, record_every: int = 25,
                     log: Optional[Callable[[dict], None]] = None,
                     probe: Optional[Callable[[int, torch.nn.Module], Dict[str, float]]] = None) -> List[dict]:
    """Train ``model`` in place for ``optim.steps`` optimizer steps; returns the loss records.

    Args:
        model: an open_clip-style module: ``model(images, texts)`` → (image b×d, text b×d, exp(logit_scale)),
            features L2-normalised, already on its device.
        batches: (images b×C×H×W float, token ids b×L) per step, on the model's device; at least
            ``optim.steps`` of them.
        optim, loss: the trainer's schemas (schedule, AdamW, clipping, logit-scale clamp; the objective).
        seed: seeds the objective's λ draws (the trainer uses ``run.seed``).
        accum_freq: micro-batches per step (``data.accum_freq``; gradients equal to the whole batch's).
        probe: called as ``probe(step, model)`` at each record's step, after that step's update; the floats it
            returns join the record (diagnostics such as the study's gradient share). It must leave the model's
            weights, mode and the random state as it found them, so a probed run trains bit-identically.
    Returns:
        a dict every ``record_every`` steps and at the last: "step", "lr", the loss terms, "logit_scale"
        (the clamped multiplier the step used) and "skipped" (non-finite steps so far). ``log`` gets each.

    A non-finite loss skips the step as the trainer does; ``optim.max_nonfinite_steps`` in a row raise
    FloatingPointError. The model is left in eval mode.
    """
    objective = ContrastiveObjective(loss, seed)
    step_fn = ContrastiveStep(model, objective, optim.max_logit_scale, accum_freq)
    optimizer = build_optimizer(model, optim)
    model.train()
    records, skipped, in_row, step = [], 0, 0, -1
    for step, (images, texts) in zip(range(optim.steps), batches):
        # Looked up on the module at every step, so a patched schedule reaches this loop (tests do that).
        lr = schedule.cosine_lr(step, optim)
        lam = objective.draw_lambda() if loss.mixes else None
        terms = step_fn(images, texts, lam)
        if terms is None:
            skipped, in_row = skipped + 1, in_row + 1
            if in_row >= optim.max_nonfinite_steps:
                raise FloatingPointError(f"{in_row} consecutive steps had a NaN/inf loss (last at step {step})")
        else:
            in_row = 0
            plain_optimizer_step(model, optimizer, lr, optim.grad_clip)
        if terms is not None and (step % record_every == 0 or step == optim.steps - 1):
            records.append({"step": step, "lr": lr, **{k: float(v) for k, v in terms.items()}, "skipped": skipped})
            if probe is not None:
                records[-1].update(probe(step, model))
            if log is not None:
                log(records[-1])
    if step != optim.steps - 1:
        raise ValueError(f"batches ran out after {step + 1} of optim.steps={optim.steps} steps")
    model.eval()
    return records
