"""Schema of `python -m train.evaluate` (loaded with common.config_loader.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List

from common.errors import ConfigError, InputError
from common.validation import Choice, Range, Rule, check_bounds
from train.config import check_templates

from .corruptions import CORRUPTIONS, SEVERITIES

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


class EvalInputError(InputError):
    """A user mistake in what `python -m train.evaluate` was pointed at (printed as one line, exit 2)."""


@dataclass
class EvalConfig:
    dataset: str = "data/fmnist"
    """Dataset folder or URL: this project's (manifest.json + shards; classification needs per-sample ``label``
    and classnames.txt) or CLIP_benchmark's webdataset format (SPLIT/nshards.txt, classnames.txt,
    zeroshot_classification_templates.txt; train/evaluate/datasets.py)."""
    split: str = "test"
    """Split of the dataset folder to evaluate on (never a training split)."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for a remote ``dataset`` (e.g. ``{key, secret, client_kwargs: {endpoint_url}}`` for an S3
    endpoint); empty = fsspec's defaults (AWS_* environment variables, ~/.aws)."""
    max_samples: int = 0
    """Evaluate on the first N samples of the split (0 = all)."""
    classnames: List[str] = field(default_factory=list)
    """Class names, overriding the dataset's classnames.txt (empty = read classnames.txt)."""
    templates: List[str] = field(default_factory=list)
    """Prompt templates of the zero-shot ensemble; ``{}`` (or CLIP_benchmark's ``{c}``) is replaced by the class
    name. Empty: the dataset's own (a CLIP_benchmark set's zeroshot_classification_templates.txt), else
    DEFAULT_TEMPLATES."""
    retrieval_relevance: str = "caption"
    """Which text counts as a correct match of an image in retrieval: ``caption`` (texts with the identical
    caption string, merged into one gallery item), ``instance`` (only the image's own caption, duplicates
    kept) or ``label`` (any caption of an image of the same class)."""
    corruptions: List[str] = field(default_factory=lambda: sorted(CORRUPTIONS))
    """Corruptions for the distribution-shift evaluation (empty = clean only)."""
    severities: List[int] = field(default_factory=lambda: list(SEVERITIES))
    """Corruption severities (1..3)."""
    reference_dataset: str = ""
    """Dataset folder of the model's *training* data (e.g. data/fmnist for data/fmnist_test). Its
    ``reference_split`` images are the k-NN reference of CyCLIP consistency and its ``calibration_split``
    images fit the temperature of temperature-scaled ECE/NLL. Empty: consistency falls back to
    leave-one-out class prototypes of the evaluated images and no temperature is fitted."""
    reference_split: str = "train"
    """Split of ``reference_dataset`` whose image embeddings the k-NN consistency votes over."""
    reference_max_samples: int = 10000
    """First N images of ``reference_split`` used as the k-NN reference (0 = all)."""
    calibration_split: str = "val"
    """Split of ``reference_dataset`` on which the zero-shot temperature is fitted (never the test split)."""
    consistency_ks: List[int] = field(default_factory=lambda: [1, 3, 5, 10, 30])
    """k of the k-NN vote (CyCLIP reports 1, 3, 5, 10, 30); ``consistency`` is their mean."""
    logit_scale: float = 0.0
    """Softmax scale of zero-shot logits, overriding the model's exp(logit_scale) (0 = the model's). Set it to
    the fixed ``loss.clip_logit_scale`` a model was fine-tuned with (the m²-Mix reference evaluates at 100)."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error."""
    batch_size: int = 256
    """Images or texts per forward pass."""
    device: str = "auto"
    """Torch device: ``auto`` (cuda when available), ``cpu`` or ``cuda[:N]``."""
    model_name: str = ""
    """open_clip model name (or the stem of a configs/model/*.json, e.g. ``tiny_vit``), for a bare checkpoint
    file (a RUN_DIR's export/model_config.json names it)."""
    model_config: str = ""
    """Path of an open_clip model config JSON for a bare checkpoint of a custom architecture."""
    out_dir: str = ""
    """Where eval.json, eval.md and the plots go (empty = RUN_DIR/eval, or ./eval for a checkpoint file)."""

    BOUNDS: ClassVar[Dict[str, Rule]] = {
        "max_samples": Range(low=0), "retrieval_relevance": Choice(("caption", "instance", "label")),
        "reference_max_samples": Range(low=0), "consistency_ks": Range(low=1), "severities": Range(low=1, high=3),
        "logit_scale": Range(low=0), "ece_bins": Range(low=1), "batch_size": Range(low=1),
    }
    """Every field's rule, written once (common/validation.py; NaN/±inf are refused for every number)."""

    def validate(self) -> None:
        """ConfigError (one line naming the key) for a value outside its rule."""
        check_bounds(self, self.BOUNDS)
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown:
            raise ConfigError(f"corruptions: unknown {unknown} (known: {sorted(CORRUPTIONS)})")
        check_templates(self.templates, "templates")
        if not self.consistency_ks:
            raise ConfigError("consistency_ks must name at least one k")
