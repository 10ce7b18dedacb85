"""One training step's math, shared by the DeepSpeed trainer and the in-process experiments.

``ContrastiveStep`` runs forward, the objective over the whole per-rank batch and backward (gradients
only); ``set_lr`` and ``plain_optimizer_step`` are the update. The trainer plugs in DeepSpeed's engine
(its backward, its accumulation boundary, a rank-agreed finiteness check); the demo and the study plug
in a plain ``nn.Module`` and ``loss.backward()``. A change to the step, the objective, the clamp or the
schedule therefore reaches every training this project runs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from train.losses.objective import ContrastiveObjective


def _local_all_finite(terms: dict) -> bool:
    return bool(torch.isfinite(terms["loss"]).all())


class ContrastiveStep:
    """forward → ``objective`` → backward over a per-rank batch of b = accum_freq × m samples.

    ``model(images, texts)`` returns ``(image_features, text_features, exp(logit_scale), ...)`` as an
    open_clip CLIP does (features L2-normalised, b×d). With ``accum_freq`` k > 1 (open_clip's
    ``--accum-freq``) the features of all k micro-batches are first computed without gradients; then each
    micro-batch is recomputed with gradients and the loss is evaluated with it in place among the cached
    rest, so the k backwards sum to exactly the gradient of the big-batch loss. The logit scale enters
    every one of the k losses, so only the first lets its gradient through (else it counts k times).

    Args:
        model: the module or DeepSpeed engine.
        objective: the loss composition (``ContrastiveObjective``).
        max_logit_scale: upper clamp of exp(logit_scale) (CLIP's 100).
        accum_freq: k, micro-batches per step.
        backward: ``backward(loss)``; default ``loss.backward()``.
        set_boundary: ``set_boundary(is_last_micro_batch)`` (DeepSpeed reduces gradients at the last one).
        all_finite: ``all_finite(terms) -> bool``: is the loss finite? ``terms`` are the step's detached loss
            terms and "logit_scale"; in a multi-rank run every rank must get the same answer. Called once per
            step, between the first forward and any backward: the trainer's hook is the step's one host sync.
    """

    def __init__(self, model, objective: ContrastiveObjective, max_logit_scale: float, accum_freq: int = 1,
                 backward: Optional[Callable] = None, set_boundary: Optional[Callable] = None,
                 all_finite: Optional[Callable] = None):
        self.model, self.objective, self.max_logit_scale, self.accum_freq = model, objective, max_logit_scale, accum_freq
        self.backward = backward or (lambda loss: loss.backward())
        self.set_boundary = set_boundary or (lambda last: None)
        self.all_finite = all_finite or _local_all_finite

    def features(self, images: torch.Tensor, texts: torch.Tensor):
        """(image b×d, text b×d, scale 0-d) in fp32, the scale clamped at ``max_logit_scale``."""
        image_features, text_features, scale = self.model(images, texts)[:3]
        # The losses run in fp32 whatever the model's dtype (METHODS: bf16 logits over a global batch lose
        # the small CyCLIP terms and the geodesic mixing); the cast's backward returns bf16 gradients.
        return (image_features.float(), text_features.float(),
                scale.float().clamp(max=self.max_logit_scale))

    def __call__(self, images: torch.Tensor, texts: torch.Tensor, lam: Optional[dict]) -> Optional[dict]:
        """Gradients of the step's loss, no update. Returns the detached loss terms plus "logit_scale", or
        None (and no backward ran) when the loss is not finite (on some rank)."""
        k = self.accum_freq
        m = images.shape[0] // k
        chunks = [(images[i * m:(i + 1) * m], texts[i * m:(i + 1) * m]) for i in range(k)]
        cached = None
        self.set_boundary(k == 1)
        if k > 1:
            with torch.no_grad():
                cached = [self.features(*chunk)[:2] for chunk in chunks]
        terms = None
        for j, chunk in enumerate(chunks):
            self.set_boundary(j == k - 1)
            image_features, text_features, scale = self.features(*chunk)
            if cached is not None:
                image_features = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1:]])
                scale = scale if j == 0 else scale.detach()
            out = self.objective(image_features, text_features, scale, lam=lam)
            if j == 0:
                terms = {name: value.detach() for name, value in out.items()}
                terms["logit_scale"] = scale.detach().reshape(())
                if not self.all_finite(terms):  # agreed by all ranks before any backward
                    return None
            self.backward(out["loss"])
        return terms


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's value into every parameter group (the schedule is a function of the step only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def plain_optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> None:
    """The update without DeepSpeed, as DeepSpeed does it: lr, global-norm clipping (0 = off), step, zero grads."""
    set_lr(optimizer, lr)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
