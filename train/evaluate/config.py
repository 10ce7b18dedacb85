"""Schema of `python -m train.evaluate` (loaded with pipeline.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..corruptions import CORRUPTIONS, SEVERITIES

# A small CLIP-style ensemble: several phrasings averaged per class, which smooths out the quirks of
# any single template (Radford et al., 2021, §3.1.4).
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a photo of the {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a close-up photo of a {}.",
    "itap of a {}.",
    "a photo of a small {}.",
]


@dataclass
class EvalConfig:
    dataset: str = "data/fmnist"
    """Dataset folder (manifest.json + shards). Classification needs per-sample ``label`` and classnames.txt."""
    split: str = "test"
    """Split of the dataset folder to evaluate on (never a training split)."""
    max_samples: int = 0
    """Evaluate on the first N samples of the split (0 = all)."""
    classnames: List[str] = field(default_factory=list)
    """Class names, overriding the dataset's classnames.txt (empty = read classnames.txt)."""
    templates: List[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Prompt templates of the zero-shot ensemble; ``{}`` is replaced by the class name."""
    retrieval_relevance: str = "caption"
    """Which text counts as a correct match of an image in retrieval: ``caption`` (texts with the identical
    caption string, merged into one gallery item), ``instance`` (only the image's own caption, duplicates
    kept) or ``label`` (any caption of an image of the same class)."""
    corruptions: List[str] = field(default_factory=lambda: sorted(CORRUPTIONS))
    """Corruptions for the distribution-shift evaluation (empty = clean only)."""
    severities: List[int] = field(default_factory=lambda: list(SEVERITIES))
    """Corruption severities (1..3)."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error."""
    batch_size: int = 256
    """Images or texts per forward pass."""
    device: str = "auto"
    """Torch device: ``auto`` (cuda when available), ``cpu`` or ``cuda[:N]``."""
    model_name: str = ""
    """open_clip model name, for a bare checkpoint file (a RUN_DIR's export/model_config.json names it)."""
    model_config: str = ""
    """Path of an open_clip model config JSON for a bare checkpoint of a custom architecture."""
    out_dir: str = ""
    """Where eval.json, eval.md and the plots go (empty = RUN_DIR/eval, or ./eval for a checkpoint file)."""

    def validate(self) -> None:
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"corruptions: unknown {unknown} (known: {sorted(CORRUPTIONS)})")
        if set(self.severities) - set(SEVERITIES):
            raise ValueError(f"severities must be within {SEVERITIES}, got {self.severities}")
        if self.retrieval_relevance not in ("caption", "instance", "label"):
            raise ValueError(f"retrieval_relevance must be caption, instance or label, "
                             f"got '{self.retrieval_relevance}'")
        if any("{}" not in t for t in self.templates):
            raise ValueError("every template needs a '{}' for the class name")
        if self.ece_bins < 1 or self.batch_size < 1 or self.max_samples < 0:
            raise ValueError("ece_bins and batch_size must be ≥ 1 and max_samples ≥ 0")
