"""Contrastive losses at global batch: CLIP, CyCLIP regularisers, geodesic m²-Mix and its uni-modal variants.

Every function takes this rank's L2-normalised features (b rows) and works unchanged in one process
and under torch.distributed, where it gathers what it needs through train/core/distributed.py.
The math is in docs/METHODS.md (CLIP §1, CyCLIP §2, m²-Mix §3).

Distributed convention (the one DDP and DeepSpeed assume, since both average gradients):
- the per-rank loss values average to the global-batch loss. Row-wise losses weight this rank's
  rows by W/N (W ranks, N global rows), so ranks with unequal batches still average exactly;
  the CyCLIP terms are already global after the Gram all-reduce, so every rank returns the value.
- after backward, the average over ranks of the parameter gradients is the gradient of the
  global loss. Because the gathers and the all-reduce send gradients back with SUM semantics
  (every rank's loss contributes to every rank's features), the gradient a rank sees on its own
  features is W x d(global loss)/d(its features); averaging parameter gradients divides the W back
  out. A replicated logit scale gets only its local gradient, and its rank average is exact.
  Neither helper rescales by 1/W: that would make the parameter gradients W times too small.
All ranks must use the same λ for the mixing terms (ContrastiveObjective seeds it identically).
The knobs and their sources are documented in docs/METHODS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import MIX_TERMS, LossConfig
from train.core.distributed import (all_gather_sizes, all_gather_with_grad, all_reduce_sum_with_grad,
                               get_rank, get_world_size)

# slerp: below this angle sin θ is too small to divide by and the arc is indistinguishable from
# its chord, so interpolate linearly and renormalise (error O(θ³) ≈ 1e-9 at the threshold).
SLERP_LINEAR_BELOW_COS = 1.0 - 1e-6
# slerp: antipodal rows have no unique geodesic; capping θ at π - 1.4e-3 keeps 1/sin θ ≤ 710.
SLERP_MIN_COS = -1.0 + 1e-6


@dataclass
class GlobalBatch:
    """This rank's rows plus the gathered global batch, shared by all the terms of one step."""

    image: Tensor         # this rank's rows, b×d
    text: Tensor
    all_image: Tensor     # every rank's rows in rank order, N×d (gradients flow back to their ranks)
    all_text: Tensor
    offset: int           # global index of this rank's first row
    global_rows: int      # N
    world_size: int       # W

    @classmethod
    def gather(cls, image: Tensor, text: Tensor, equal_rows: bool = False) -> "GlobalBatch":
        """``equal_rows``: the caller guarantees every rank passes as many rows as this one, so the row counts
        need no exchange (an all-gather read back to the host: a host sync per call on a GPU)."""
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be b×d")
        sizes = [image.shape[0]] * get_world_size() if equal_rows else all_gather_sizes(image.shape[0], image.device)
        return cls(image, text, all_gather_with_grad(image, sizes), all_gather_with_grad(text, sizes),
                   offset=sum(sizes[:get_rank()]), global_rows=sum(sizes), world_size=len(sizes))

    @property
    def labels(self) -> Tensor:
        """Global column index of each local row's positive."""
        return torch.arange(self.offset, self.offset + self.image.shape[0], device=self.image.device)

    def local_rows(self, x: Tensor) -> Tensor:
        return x[self.offset:self.offset + self.image.shape[0]]

    def rank_share(self, per_row: Tensor) -> Tensor:
        """This rank's share of the global mean over rows: the W per-rank values average to it."""
        return per_row.sum() * (self.world_size / self.global_rows)


def _as_scale(logit_scale: Tensor | float) -> Tensor | float:
    # open_clip's logit_scale may be [] or [1] (nonscalar_logit_scale=True for DeepSpeed).
    return logit_scale.reshape(()) if isinstance(logit_scale, Tensor) else float(logit_scale)


def _at_least_fp32(logits: Tensor) -> Tensor:
    # Matmuls may run in bf16/fp16; log-sum-exp over N columns needs fp32 to stay exact.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


# --------------------------------------------------------------------------- CLIP (METHODS §1)
def _clip(batch: GlobalBatch, scale: Tensor | float) -> Tensor:
    logits_image = _at_least_fp32(batch.image @ batch.all_text.T) * scale    # b×N, never N×N
    logits_text = _at_least_fp32(batch.text @ batch.all_image.T) * scale
    per_row = 0.5 * (F.cross_entropy(logits_image, batch.labels, reduction="none")
                     + F.cross_entropy(logits_text, batch.labels, reduction="none"))
    return batch.rank_share(per_row)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE over the global batch, as a local loss (this rank's rows × all N columns).

    `logit_scale` is the multiplier s = exp(parameter), a float or a one-element tensor.
    """
    return _clip(GlobalBatch.gather(image, text), _as_scale(logit_scale))


# --------------------------------------------------------------------------- CyCLIP (METHODS §2)
class _GramProducts(torch.autograd.Function):
    """(IᵀI, TᵀT, IᵀT) as one 3×d×d fp64 tensor, with a hand-written backward.

    Autograd's backward of three matmuls materialises six N×d partial gradients and sums them; here
    each input gradient is one N×d buffer filled by a matmul and an in-place addmm, so the only N×d
    memory the regularisers allocate is the two gradients the caller needs anyway.
    """

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor) -> Tensor:
        work = torch.promote_types(image.dtype, torch.float32)
        i, t = image.to(work), text.to(work)
        ctx.save_for_backward(i, t)
        ctx.input_dtypes = (image.dtype, text.dtype)
        return torch.stack([i.T @ i, t.T @ t, i.T @ t]).double()

    @staticmethod
    def backward(ctx, grad: Tensor):
        i, t = ctx.saved_tensors
        d_ii, d_tt, d_it = grad.to(i.dtype).unbind(0)
        # ∂⟨G, IᵀI⟩/∂I = I(G + Gᵀ);  ∂⟨G, IᵀT⟩/∂I = T Gᵀ and /∂T = I G.
        grad_image = (i @ (d_ii + d_ii.T)).addmm_(t, d_it.T) if ctx.needs_input_grad[0] else None
        grad_text = (t @ (d_tt + d_tt.T)).addmm_(i, d_it) if ctx.needs_input_grad[1] else None
        return (None if grad_image is None else grad_image.to(ctx.input_dtypes[0]),
                None if grad_text is None else grad_text.to(ctx.input_dtypes[1]))


def _cyclic(image: Tensor, text: Tensor, global_rows: int) -> tuple[Tensor, Tensor]:
    out_dtype = torch.promote_types(image.dtype, torch.float32)
    # Gram products in (at least) fp32, combined in fp64. Both terms are differences of terms of size
    # S = (‖IᵀI‖² + ‖TᵀT‖²)/N; test_losses bounds the error by 1e-7·S on values and 1e-5 of ∇S on
    # gradients (1e-5 relative to the term unless the modalities nearly coincide, where C is tiny
    # next to the CLIP loss). fp64 products would cost 1.7x on CPU and far more on GPUs.
    grams = _GramProducts.apply(image, text)
    g_ii, g_tt, g_it = all_reduce_sum_with_grad(grams).unbind(0)    # Σ over ranks = global Grams
    in_modal = (g_ii.square().sum() - 2 * g_it.square().sum() + g_tt.square().sum()) / global_rows
    cross_modal = 2 * ((g_ii * g_tt).sum() - (g_it * g_it.T).sum()) / global_rows
    return in_modal.to(out_dtype), cross_modal.to(out_dtype)


def cyclic_regularizers(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """CyCLIP's (in-modal, cross-modal) consistency terms over the global batch, divided by global N.

    C_in = ‖IIᵀ − TTᵀ‖²_F / N and C_cross = ‖ITᵀ − TIᵀ‖²_F / N, through d×d Gram matrices and one
    all-reduce: O(N·d²) time, O(d²) memory, no N×N matrix. Every rank returns the global value.
    """
    return _cyclic(image, text, sum(all_gather_sizes(image.shape[0], image.device)))


# --------------------------------------------------------------------------- slerp (METHODS §3)
def slerp(a: Tensor, b: Tensor, lam: Tensor | float) -> Tensor:
    """Geodesic interpolation between unit rows, textbook convention: lam=0 gives a, lam=1 gives b.

    slerp(a, b, λ) = sin((1−λ)θ)/sin θ · a + sin(λθ)/sin θ · b, θ = arccos⟨a, b⟩ (the m²-Mix reference
    weights a by sin(λθ) instead, i.e. uses 1−λ; symmetric Beta(α, α) sampling makes them equivalent).
    `lam` is a scalar or one value per row. Math runs in at least fp32 (fp64 stays fp64); the result
    has the input dtype. Nearly identical rows fall back to normalised linear interpolation; nearly
    antipodal rows (no unique geodesic) get θ capped, so values and gradients stay finite.
    """
    out_dtype = a.dtype
    work_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(work_dtype), b.to(work_dtype)
    lam = torch.as_tensor(lam, dtype=work_dtype, device=a.device)
    if lam.ndim == 1:
        lam = lam.unsqueeze(-1)
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(SLERP_MIN_COS, 1.0)
    near = cos > SLERP_LINEAR_BELOW_COS
    # Each branch sees harmless inputs on the rows it does not own, so that torch.where's zero
    # gradient is not multiplied by an inf/NaN from arccos'(1) or from normalising a zero vector.
    theta = torch.acos(torch.where(near, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    geodesic = (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / sin_theta
    chord = (1 - lam) * a + lam * torch.where(near, b, a)
    # Back onto the sphere by a constant factor: the gradient stays the chord's, which for a == b
    # is the identity, the exact derivative of slerp(a, a, λ) = a.
    chord = chord / chord.norm(dim=-1, keepdim=True).detach()
    return torch.where(near, chord, geodesic).to(out_dtype)


# --------------------------------------------------------------------------- m²-Mix (METHODS §3)
def _m2mix(batch: GlobalBatch, scale: Tensor | float, lam: float, mix_scale: Tensor | float | None) -> Tensor:
    mix_scale = scale if mix_scale is None else mix_scale
    # Hard negatives from the gathered features: the same values a gather of h would give, one
    # all-gather fewer, and gradients still reach every rank through the feature gathers.
    hard = slerp(batch.all_image, batch.all_text, lam)
    positive = (batch.image * batch.text).sum(dim=-1, keepdim=True)
    column = batch.labels.unsqueeze(1)
    per_row = 0
    for anchor in (batch.image, batch.text):
        logits = (anchor @ hard.T).scatter(1, column, positive)    # diagonal := positive logit
        per_row = per_row + 0.5 * F.cross_entropy(_at_least_fp32(logits) * mix_scale, batch.labels,
                                                  reduction="none")
    return batch.rank_share(per_row)


def m2mix_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, lam: float,
               mix_logit_scale: Tensor | float | None = None) -> Tensor:
    """m²-Mix: CE of image→h and text→h logits, h_i = slerp(image_i, text_i, λ), diagonal = ⟨I_i, T_i⟩.

    Returns the mean of the two cross-entropies (the reference sums them: its weight w is 2w here).
    `mix_logit_scale` multiplies the mixed logits, positive included (the reference's τ₂);
    None uses `logit_scale`.
    """
    return _m2mix(GlobalBatch.gather(image, text), _as_scale(logit_scale), lam,
                  None if mix_logit_scale is None else _as_scale(mix_logit_scale))


# ------------------------------------------------------- uni-modal V-Mix / L-Mix / VL-Mix (METHODS §3)
def _unimodal_mix(batch: GlobalBatch, scale: Tensor | float, lam: float, mix_image: bool,
                  mix_text: bool) -> Tensor:
    n = batch.global_rows
    partner = torch.arange(n - 1, -1, -1, device=batch.image.device)    # row i mixes with row N−1−i
    images = slerp(batch.all_image, batch.all_image[partner], lam) if mix_image else batch.all_image
    texts = slerp(batch.all_text, batch.all_text[partner], lam) if mix_text else batch.all_text
    rows = batch.labels
    targets = torch.zeros(rows.shape[0], n, dtype=torch.promote_types(images.dtype, torch.float32),
                          device=images.device)
    if mix_image and mix_text:
        # Both sides mixed with the same λ: the reference's target is diag + anti-diag, weight 1 each.
        self_weight, partner_weight = 1.0, 1.0
    else:
        # Textbook slerp puts weight 1−λ on the row itself (the reference, weighting by λ, uses λ).
        self_weight, partner_weight = 1.0 - lam, lam
    local = torch.arange(rows.shape[0], device=rows.device)
    targets[local, rows] += self_weight
    targets[local, partner[rows]] += partner_weight    # adds, so the middle row of an odd N sums to 1
    logits_image = _at_least_fp32(batch.local_rows(images) @ texts.T) * scale
    logits_text = _at_least_fp32(batch.local_rows(texts) @ images.T) * scale
    per_row = 0.5 * (_soft_cross_entropy(logits_image, targets) + _soft_cross_entropy(logits_text, targets))
    return batch.rank_share(per_row)


def vmix_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, lam: float) -> Tensor:
    """V-Mix: image i slerped with image N−1−i against all texts, soft targets (1−λ)·diag + λ·anti-diag."""
    return _unimodal_mix(GlobalBatch.gather(image, text), _as_scale(logit_scale), lam, True, False)


def lmix_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, lam: float) -> Tensor:
    """L-Mix: text i slerped with text N−1−i against all images, soft targets (1−λ)·diag + λ·anti-diag."""
    return _unimodal_mix(GlobalBatch.gather(image, text), _as_scale(logit_scale), lam, False, True)


def vlmix_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, lam: float) -> Tensor:
    """VL-Mix: both modalities mixed with the same λ, targets diag + anti-diag (as the reference)."""
    return _unimodal_mix(GlobalBatch.gather(image, text), _as_scale(logit_scale), lam, True, True)


# --------------------------------------------------------------------------- composition from config
class ContrastiveObjective:
    """CLIP plus the configured weighted terms, so the training loop never branches per method.

    Pretraining: CLIP + f·λ₁·C_in + f·λ₂·C_cross (f = N_ref/N or 1). Fine-tuning: CLIP + g·(w·m²-Mix +
    V/L/VL-Mix), g the schedule factor. Features are gathered once per call and shared by every term;
    terms with weight 0 are skipped. ``equal_rows``: every rank passes the same number of rows (the trainer's
    b = B/W), so no call exchanges row counts (``GlobalBatch.gather``).
    """

    def __init__(self, cfg: LossConfig, seed: int, equal_rows: bool = False):
        cfg.validate()  # a config built in code (not by load_config) is checked where it is used; ConfigError
        self.cfg, self.equal_rows = cfg, equal_rows
        # Same seed on every rank → same λ everywhere, with no collective. numpy's Generator owns its
        # state (torch's Beta sampler reads only the global RNG), and that state is a plain dict.
        self._rng = np.random.default_rng(seed)
        self._steps = 0    # draws so far = optimizer steps taken (drives the mix-weight schedule)

    def draw_lambda(self) -> dict[str, float]:
        """This step's draws: {term: λ} for each active mixing term, each from its own Beta(α_term, α_term)
        as in the reference, plus "mix_weight_factor" (the schedule's g). Call once per optimizer step
        and pass the dict to every micro-batch of the step."""
        alphas = {t: getattr(self.cfg, f"{t}_alpha") for t in MIX_TERMS if getattr(self.cfg, f"{t}_weight") > 0}
        draws = {t: float(self._rng.beta(a, a)) for t, a in alphas.items()}    # in MIX_TERMS order
        draws["mix_weight_factor"] = self.cfg.mix_weight_factor(self._steps)
        self._steps += 1
        return draws

    def __call__(self, image: Tensor, text: Tensor, logit_scale: Tensor | float,
                 lam: float | dict | None = None) -> dict[str, Tensor]:
        """Returns {"loss": weighted total, "clip": ..., then each active term unweighted}.

        Both CyCLIP terms are reported when either is weighted: they share one Gram all-reduce.
        `lam` is the step's draw_lambda() dict, or one float used by every mixing term (factor 1);
        None draws here. With ``clip_logit_scale`` set, `logit_scale` enters the loss only as
        0·logit_scale, so a learned scale parameter gets an exact zero gradient (never None, which
        ZeRO's gradient buckets do not expect).
        """
        cfg = self.cfg
        if cfg.mixes and lam is None:
            lam = self.draw_lambda()
        draws = lam if isinstance(lam, dict) else {t: lam for t in MIX_TERMS}
        mix_factor = draws.get("mix_weight_factor", 1.0)
        scale = _as_scale(logit_scale) if cfg.clip_logit_scale is None else float(cfg.clip_logit_scale)
        batch = GlobalBatch.gather(image, text, self.equal_rows)
        terms = {"clip": _clip(batch, scale)}
        weighted = [(1.0, "clip")]
        if cfg.cyclip_in_modal > 0 or cfg.cyclip_cross_modal > 0:
            f = cfg.cyclip_factor(batch.global_rows)
            terms["cyclip_in"], terms["cyclip_cross"] = _cyclic(image, text, batch.global_rows)
            weighted += [(f * cfg.cyclip_in_modal, "cyclip_in"), (f * cfg.cyclip_cross_modal, "cyclip_cross")]
        if cfg.m2mix_weight > 0:
            terms["m2mix"] = _m2mix(batch, scale, draws["m2mix"], cfg.m2mix_logit_scale)
            weighted.append((mix_factor * cfg.m2mix_weight, "m2mix"))
        for name, weight, mix_image, mix_text in (("vmix", cfg.vmix_weight, True, False),
                                                  ("lmix", cfg.lmix_weight, False, True),
                                                  ("vlmix", cfg.vlmix_weight, True, True)):
            if weight > 0:
                terms[name] = _unimodal_mix(batch, scale, draws[name], mix_image, mix_text)
                weighted.append((mix_factor * weight, name))
        total = sum(weight * terms[name] for weight, name in weighted if weight > 0)
        if cfg.clip_logit_scale is not None and isinstance(logit_scale, Tensor) and logit_scale.requires_grad:
            total = total + 0.0 * logit_scale.sum()
        terms["loss"] = total
        return terms

    def state_dict(self) -> dict:
        """{"lambda_generator": numpy bit-generator state (str/int only: pickle-, JSON- and
        torch.load(weights_only=True)-safe), "steps": draws so far}."""
        return {"lambda_generator": self._rng.bit_generator.state, "steps": self._steps}    # a fresh dict

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state["lambda_generator"], dict):    # a torch ByteTensor: written before numpy
            raise ValueError("this checkpoint's λ sampler state is from an older code version (torch generator)")
        self._rng.bit_generator.state = state["lambda_generator"]
        self._steps = int(state.get("steps", 0))    # checkpoints from before the schedule existed
