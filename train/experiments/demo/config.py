"""The demo's settings (`configs/demo/{full,fast}.yaml`, key=value overrides), torch-free.

The trainings themselves are configured by the trainer's own configs (configs/pretrain_*.yaml,
configs/finetune_*.yaml) plus the overrides below, so the demo runs exactly what `make pretrain` runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List

from common.validation import Range, Rule, check_bounds


@dataclass
class DemoConfig:
    data: str = "data/fmnist_demo"
    """Train/val dataset folder; `pipeline demo` writes the held-out test split to DATA_test."""
    train_per_class: int = 1500
    """Fashion-MNIST training images per class put through ingestion (train + val)."""
    test_per_class: int = 300
    """Fashion-MNIST test images per class put through ingestion (the held-out test split)."""
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    """Seeds of every arm; each fine-tuning seed starts from the pretraining of the same seed."""
    ranks: int = 2
    """Local training processes (gloo on CPU)."""
    pretrain_overrides: List[str] = field(default_factory=list)
    """key=value overrides applied to both pretraining configs (same budget for CLIP and CyCLIP)."""
    cyclip_overrides: List[str] = field(default_factory=list)
    """key=value overrides for the CyCLIP pretraining arm only (its lambda, chosen on val by ``make study``)."""
    finetune_overrides: List[str] = field(default_factory=list)
    """key=value overrides applied to both fine-tuning configs (same budget for plain and m²-Mix)."""
    eval_max_samples: int = 1000
    """Test images evaluated, clean and in each of the 12 corrupted copies (0 = all)."""
    eval_reference_samples: int = 3000
    """Training images whose embeddings CyCLIP's k-NN consistency votes over (the val split fits the ECE temperature)."""
    eval_batch_size: int = 500
    """Images per forward pass in evaluation."""
    tune_pretrain_lr: List[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    """--tune: pretraining learning rates tried (CLIP loss, seed of the first entry of ``seeds``)."""
    tune_finetune_lr: List[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    """--tune: plain fine-tuning learning rates tried, from the best pretraining of the sweep."""

    BOUNDS: ClassVar[Dict[str, Rule]] = {
        "train_per_class": Range(low=1), "test_per_class": Range(low=1), "seeds": Range(low=0),
        "ranks": Range(low=1), "eval_max_samples": Range(low=0), "eval_reference_samples": Range(low=0),
        "eval_batch_size": Range(low=1), "tune_pretrain_lr": Range(low=0, low_open=True),
        "tune_finetune_lr": Range(low=0, low_open=True),
    }
    """Every field's rule, written once (common/validation.py; NaN/±inf are refused for every number)."""

    def validate(self) -> None:
        """ConfigError (one line naming the key) for a value outside its rule."""
        check_bounds(self, self.BOUNDS)
