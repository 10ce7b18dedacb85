"""The study's settings (`configs/study/*.yaml`, key=value overrides), torch-free: a config is checked before
any model is built.

Every run's optimizer and loss are the trainer's own schemas (``OptimConfig``, ``LossConfig``), built by the
methods below: the study sets the budget, learning rate, warmup, weight decay and the method's weights; every
other optimizer setting (AdamW betas and eps, min_lr, gradient clipping, the logit-scale clamp, the fused
kernel) is the trainer's default, so changing that default changes the study too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List

from common.errors import ConfigError, UserError
from common.validation import Range, Rule, check_bounds
from train.config import LossConfig, OptimConfig

RECORD_EVERY = 25
"""Steps between a run's loss records (train_in_process's ``record_every``) when the probe needs no others."""


@dataclass
class StudyConfig:
    out: str = "study"
    """Output folder: runs/, cache/, plots/, REPORT.md, results.json."""
    device: str = "cpu"
    """Torch device (``cuda`` for the GPU profile)."""
    threads: int = 2
    """torch intra-op threads on CPU."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Paired seeds: every arm runs each; the first also does the tuning."""
    pretrain_size: int = 48000
    """Fashion-MNIST training images used as pretraining pairs."""
    val_size: int = 3000
    """Training images held out as val (tuning and temperature fitting)."""
    finetune_size: int = 9000
    """Training images held out from pretraining as the shifted fine-tuning pool."""
    test_size: int = 10000
    """Test images (all 10,000 by default), clean and in each of the 12 corrupted copies."""
    reference_size: int = 10000
    """Pretraining images whose embeddings the k-NN consistency votes over."""
    pretrain_steps: int = 2000
    """Optimizer steps per pretraining run: the cap of the budget rule (design.settling: the report says
    whether CLIP's logit scale had settled by then)."""
    pretrain_batch: int = 256
    """Global batch of pretraining (one process)."""
    pretrain_warmup: int = 30
    """Linear warmup steps before the cosine schedule."""
    pretrain_weight_decay: float = 0.2
    """AdamW weight decay (CLIP's 0.2)."""
    pretrain_lrs: List[float] = field(default_factory=lambda: [3e-3])
    """Learning rates tried on val for each pretraining arm (one value: no lr tuning)."""
    cyclip_lambdas: List[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    """λ₁ = λ₂ tried on val for CyCLIP, stated at ``cyclip_reference_batch`` (the paper: 0.25 at 512)."""
    cyclip_reference_batch: int = 512
    """N_ref of ``loss.cyclip_reference_batch``: the batch at which the λ values above are stated."""
    finetune_steps: int = 900
    """Optimizer steps per fine-tuning run."""
    finetune_batch: int = 128
    """The m²-Mix reference's batch size."""
    finetune_warmup: int = 30
    """Linear warmup steps of fine-tuning."""
    finetune_weight_decay: float = 0.2
    """AdamW weight decay of fine-tuning."""
    finetune_lrs: List[float] = field(default_factory=lambda: [3e-4])
    """Learning rates tried on val for each fine-tuning arm."""
    m2mix_weights: List[float] = field(default_factory=lambda: [0.02, 0.1])
    """w tried on val (this repo's mean convention: the reference's 0.01 and 0.05)."""
    finetune_clip_scale: float = 100.0
    """Fixed CLIP scale while fine-tuning, both arms (the reference's τ = 0.01)."""
    m2mix_logit_scale: float = 1 / 0.07
    """The reference's separate mix scale (--sep_scale, τ₂ = 0.07)."""
    m2mix_alpha: float = 0.5
    """α of λ ~ Beta(α, α) for m²-Mix (the reference's 0.5)."""
    grad_share_sizes: List[int] = field(default_factory=lambda: [64, 512, 4096, 32768])
    """Global batches at which the regularisers' gradient share is measured on real features."""
    grid_extensions: int = 2
    """Values added to the λ (w) grid, one at a time, while its val best sits at the grid's edge
    (design.next_grid_value: ×2.5 above, ×0.5 below); 0: the grid as given."""
    probe_every: int = 100
    """Steps between training probes (logit scale, the regularisers' gradient share, alignment and
    uniformity on ``probe_size`` val pairs; lib.Probe), and at the last step. The loss records come every
    gcd(RECORD_EVERY, probe_every) steps, so every probe has its record."""
    probe_size: int = 256
    """Val pairs of the probe (the pretraining batch: the share is measured at the batch trained with); at
    most ``val_size`` (checked when the study starts)."""
    settle_window: float = 0.2
    """The budget rule's window: the last 20% of a run (of its steps and of its summed lr, design.py)."""
    settle_tolerance: float = 0.05
    """The budget rule's bound on the relative change over the window."""
    baseline_pretrain_steps: int = 300
    """The earlier study's budget, rerun (CLIP; CyCLIP at ``baseline_cyclip_lambda`` and at the newly
    chosen λ) to tell which change moved which verdict; 0 skips it."""
    baseline_cyclip_lambda: float = 0.05
    """The λ the earlier study chose (the smallest of its grid, 0.05 and 0.25)."""
    previous_verdicts: str = "study/verdicts_300_steps.json"
    """The earlier study's verdicts, shown beside the new ones (relative to the repository root; "" or a
    missing file: no such column)."""

    BOUNDS: ClassVar[Dict[str, Rule]] = {
        **{k: Range(low=1) for k in ("threads", "pretrain_size", "val_size", "finetune_size", "test_size",
                                     "reference_size", "pretrain_batch", "cyclip_reference_batch",
                                     "finetune_batch", "grad_share_sizes", "probe_every")},
        "probe_size": Range(low=2),    # one pair has no negative: CLIP's gradient is 0
        # two steps at least: the budget rule compares a run's first and last records
        "pretrain_steps": Range(low=2), "finetune_steps": Range(low=2),
        "grid_extensions": Range(low=0), "baseline_pretrain_steps": Range(low=0),
        "settle_window": Range(low=0, high=1, low_open=True, high_open=True),
        "settle_tolerance": Range(low=0, low_open=True),
        "seeds": Range(low=0), "pretrain_warmup": Range(low=0), "finetune_warmup": Range(low=0),
        **{k: Range(low=0) for k in ("pretrain_weight_decay", "finetune_weight_decay")},
        # λ = 0 and w = 0 are the baselines (CLIP, plain), always run: the grids hold the methods' values
        **{k: Range(low=0, low_open=True) for k in ("pretrain_lrs", "finetune_lrs", "finetune_clip_scale",
                                                    "baseline_cyclip_lambda", "cyclip_lambdas", "m2mix_weights",
                                                    "m2mix_logit_scale", "m2mix_alpha")},
    }
    """Every field's rule, written once (common/validation.py; NaN/±inf are refused for every number)."""

    def validate(self) -> None:
        """ConfigError (one line naming the key) for a value outside its rule or an empty list."""
        check_bounds(self, self.BOUNDS)
        for key in ("seeds", "pretrain_lrs", "cyclip_lambdas", "finetune_lrs", "m2mix_weights"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: empty; give at least one value")
            if len(set(getattr(self, key))) != len(getattr(self, key)):
                raise ConfigError(f"{key}: {getattr(self, key)} repeats a value (a repeated seed would count one "
                                  "run as two paired seeds)")

    def check_sizes(self, train_images: int = 60000, test_images: int = 10000, max_k: int = 30) -> None:
        """UserError (one line) for sizes that fit each field's own rule but not each other, checked before
        anything is built: the splits within Fashion-MNIST's ``train_images``, a batch within its pool, the
        k-NN reference within the pretraining pairs and above the largest k, the probe within val, two test
        images for uniformity, warmup shorter than the run, the earlier budget of two steps or none."""
        problems = []
        if self.pretrain_size + self.val_size + self.finetune_size > train_images:
            problems.append(f"pretrain_size + val_size + finetune_size = "
                            f"{self.pretrain_size + self.val_size + self.finetune_size} > the {train_images} training images")
        for batch, pool in (("pretrain_batch", "pretrain_size"), ("finetune_batch", "finetune_size"),
                            ("probe_size", "val_size"), ("reference_size", "pretrain_size")):
            if getattr(self, batch) > getattr(self, pool):
                problems.append(f"{batch}={getattr(self, batch)} > {pool}={getattr(self, pool)}")
        if self.reference_size < max_k:
            problems.append(f"reference_size={self.reference_size} < {max_k}, the largest k of the k-NN consistency")
        if self.test_size > test_images:
            problems.append(f"test_size={self.test_size} > the {test_images} test images")
        if self.test_size < 2:
            problems.append(f"test_size={self.test_size}: uniformity needs at least 2 test images")
        for warmup, steps in (("pretrain_warmup", "pretrain_steps"), ("finetune_warmup", "finetune_steps")):
            if getattr(self, warmup) >= getattr(self, steps):
                problems.append(f"{warmup}={getattr(self, warmup)} >= {steps}={getattr(self, steps)}")
        if self.baseline_pretrain_steps == 1:
            problems.append("baseline_pretrain_steps=1: give 0 (none) or at least 2 steps")
        if problems:
            raise UserError("study config: " + "; ".join(problems))

    def pretrain_optim(self, lr: float, steps: int = 0) -> OptimConfig:
        """One pretraining run's optimizer and schedule (the trainer's defaults for everything not set here);
        ``steps``: another budget than ``pretrain_steps`` (the baseline's)."""
        return OptimConfig(steps=steps or self.pretrain_steps, lr=lr, warmup_steps=self.pretrain_warmup,
                           weight_decay=self.pretrain_weight_decay)

    def finetune_optim(self, lr: float) -> OptimConfig:
        """One fine-tuning run's optimizer and schedule."""
        return OptimConfig(steps=self.finetune_steps, lr=lr, warmup_steps=self.finetune_warmup,
                           weight_decay=self.finetune_weight_decay)

    def pretrain_loss(self, lam: float) -> LossConfig:
        """CLIP (λ = 0) or CyCLIP with λ₁ = λ₂ = λ stated at ``cyclip_reference_batch``."""
        return LossConfig(cyclip_in_modal=lam, cyclip_cross_modal=lam,
                          cyclip_reference_batch=self.cyclip_reference_batch if lam else None)

    def finetune_loss(self, w: float) -> LossConfig:
        """Plain fine-tuning (w = 0) or m²-Mix with weight w, both at the reference's fixed CLIP scale; m²-Mix
        with its separate mix scale and the 1/(epoch+1) weight schedule (the reference's --schedule)."""
        epoch_steps = max(1, self.finetune_size // self.finetune_batch)
        return LossConfig(clip_logit_scale=self.finetune_clip_scale, m2mix_weight=w,
                          m2mix_logit_scale=self.m2mix_logit_scale if w else None, m2mix_alpha=self.m2mix_alpha,
                          mix_weight_schedule="inverse_epoch" if w else "constant",
                          schedule_epoch_steps=epoch_steps if w else 0)
