"""Evaluation of CLIP-style models: zero-shot, retrieval, CyCLIP consistency, embedding geometry,
calibration and distribution shift (docs/METHODS.md §4). CLI: ``python -m train.evaluate``."""
from .config import EvalConfig
from .core import evaluate, headline

__all__ = ["EvalConfig", "evaluate", "headline"]
