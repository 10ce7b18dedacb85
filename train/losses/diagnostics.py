"""How strongly each term of the objective pulls: feature gradients of CLIP and of CyCLIP's regularisers.

Diagnostics, not training: the study reports the regularisers' gradient share on a model's real features
(train/experiments/study/run.py) and benchmarks/bench_loss_balance.py tabulates it on synthetic ones.
Both read these functions, so the two tables measure the same quantity (docs/METHODS.md §2).
"""
from __future__ import annotations

import math

import torch

from train.losses.objective import cyclic_regularizers


def clip_feature_grads(image: torch.Tensor, text: torch.Tensor, scale: float, chunk: int = 2048):
    """(∂L_clip/∂I, ∂L_clip/∂T), each N×d, for the symmetric InfoNCE over N rows, without an N×N matrix.

    L = (CE(sIT^T, id) + CE(sTI^T, id)) / 2, so with Z = s·I·Tᵀ, dZ = (softmax_rows(Z) + softmax_cols(Z) −
    2·Id) / (2N), ∇I = s·dZ·T and ∇T = s·dZᵀ·I. Two passes over row chunks of ``chunk`` rows: the row and
    column log-sum-exps first, then the gradients. ``image``, ``text``: N×d, L2-normalised rows; ``scale``:
    the multiplier s = exp(logit_scale).
    """
    n = image.shape[0]
    row_lse = torch.empty(n)
    col_lse = torch.full((n,), -math.inf)
    for s0 in range(0, n, chunk):
        z = scale * image[s0:s0 + chunk] @ text.T
        row_lse[s0:s0 + chunk] = torch.logsumexp(z, 1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(z, 0))
    grad_i, grad_t = torch.empty_like(image), torch.zeros_like(text)
    for s0 in range(0, n, chunk):
        z = scale * image[s0:s0 + chunk] @ text.T
        dz = (z - row_lse[s0:s0 + chunk, None]).exp() + (z - col_lse[None, :]).exp()
        rows = torch.arange(s0, min(s0 + chunk, n))
        dz[rows - s0, rows] -= 2.0
        dz *= 1.0 / (2 * n)
        grad_i[s0:s0 + chunk] = scale * dz @ text
        grad_t += scale * dz.T @ image[s0:s0 + chunk]
    return grad_i, grad_t


def regulariser_grads(image: torch.Tensor, text: torch.Tensor, weight: float):
    """(∂/∂I, ∂/∂T) of weight·(C_in + C_cross) (CyCLIP, Goel et al. 2022; each N×d) by autograd."""
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    c_in, c_cross = cyclic_regularizers(i, t)
    return torch.autograd.grad(weight * (c_in + c_cross), (i, t))


def regulariser_share(image: torch.Tensor, text: torch.Tensor, scale: float, weight: float) -> float:
    """‖∇ weight·(C_in + C_cross)‖ / ‖∇ L_clip‖, both w.r.t. all N image and text rows (Frobenius norms
    over the two N×d gradients together): how much of the features' pull the regularisers carry."""
    gi, gt = clip_feature_grads(image, text, scale)
    ri, rt = regulariser_grads(image, text, weight)
    return math.sqrt(float(ri.square().sum() + rt.square().sum()) / float(gi.square().sum() + gt.square().sum()))
