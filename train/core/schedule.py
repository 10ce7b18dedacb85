"""The learning-rate schedule of every training in this project (the trainer, the demo and the study).

A pure function of the step, so a resumed run needs no scheduler state (docs/METHODS.md §3).
"""
from __future__ import annotations

import math

from train.config import OptimConfig


def cosine_lr(step: int, cfg: OptimConfig) -> float:
    """Learning rate before optimizer step ``step`` (0-based).

    Linear warmup over ``cfg.warmup_steps`` steps to ``cfg.lr`` (step 0 gets lr/warmup, never 0), then
    cosine decay to ``cfg.min_lr`` at ``cfg.steps`` (Loshchilov & Hutter 2017, SGDR, without restarts;
    open_clip_train's ``cosine_lr``); constant at ``cfg.min_lr`` past ``cfg.steps``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
