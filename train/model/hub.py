"""open_clip's hub layout: the one export format of this project.

An export folder holds exactly what ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` (and so
CLIP_benchmark's ``--model local-dir:FOLDER``) reads, plus a note of where it came from:

    open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {size, mean, std, interpolation,
                                   resize_mode, ...}}  (open_clip's hf-hub / local-dir config file)
    open_clip_model.safetensors  the fp32 weights: a plain open_clip state dict, scalar logit_scale
    info.json                    {model_name, step, source}: this project's note, read by no loader

``model_cfg`` is the architecture the run trained, with ``model.force_image_size`` and ``model.model_kwargs``
applied, so it loads the same for built-in and custom (``configs/model/*.json``) models. ``preprocess_cfg``
is read off the trained model (``open_clip.get_model_preprocess_cfg``), so a loader gets the training run's
eval transform. The former ``model.pt`` + ``model_config.json`` pair is retired: those files are still read
as ``model.pretrained`` weights, never written.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from common.atomic_files import atomic_path

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
INFO_FILE = "info.json"
if TYPE_CHECKING:    # torch-free at import: the dry run (train/core/preflight.py) reads these names
    import torch

RETIRED_FILES = ("model.pt", "model_config.json")
"""Files of the former export layout; an export into a folder that has them removes them."""

# create_model_and_transforms keywords that set a field of model_cfg (open_clip/factory.py, "force_*").
_FORCED_FIELDS = {"force_image_size": ("vision_cfg", "image_size"), "force_patch_dropout": ("vision_cfg", "patch_dropout"),
                  "force_context_length": ("text_cfg", "context_length"), "force_quick_gelu": (None, "quick_gelu"),
                  "force_custom_text": (None, "custom_text")}
# Keywords that shape the transforms, not the architecture: preprocess_cfg (read off the model) holds them.
_PREPROCESS_KWARGS = {"image_mean", "image_std", "image_interpolation", "image_resize_mode", "aug_cfg"}
# Keywords of how a model is built or loaded, not what it is (nonscalar_logit_scale: DeepSpeed's [1]-shaped
# scale; the export's logit_scale is a scalar again).
_LOADER_KWARGS = {"nonscalar_logit_scale", "precision", "device", "jit", "cache_dir", "output_dict", "pretrained_image",
                  "pretrained_text", "pretrained_image_path", "pretrained_text_path", "load_weights", "weights_only",
                  "require_pretrained", "pretrained_hf"}


def export_model_cfg(base_cfg: Dict[str, Any], force_image_size: Optional[int] = None,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model_cfg a run trained: ``base_cfg`` (open_clip's config of the model name) with the trainer's
    overrides applied the way ``open_clip.create_model`` applies them (force_* fields, then the remaining
    constructor keywords on top)."""
    cfg = copy.deepcopy(base_cfg)
    kwargs = dict(model_kwargs or {})
    if force_image_size is not None:
        kwargs["force_image_size"] = force_image_size
    for key, value in kwargs.items():
        if key in _FORCED_FIELDS:
            if value is None or value is False:
                continue
            section, name = _FORCED_FIELDS[key]
            (cfg.setdefault(section, {}) if section else cfg)[name] = value
        elif key not in _PREPROCESS_KWARGS and key not in _LOADER_KWARGS:
            cfg[key] = value
    return cfg


def hub_config(model: torch.nn.Module, model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``open_clip_config.json``: ``model_cfg`` and the model's own preprocess config (its eval transform)."""
    from open_clip import get_model_preprocess_cfg

    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(model).items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_export(out_dir: str | os.PathLike, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any],
                 info: Dict[str, Any]) -> Path:
    """Write an export folder (weights, then config, then info; each file atomically). Returns the folder.

    ``state_dict`` must already be a plain open_clip state dict (train.model.build.export_state_dict).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RETIRED_FILES:    # a loader must not find two sets of weights in one folder
        (out / name).unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2))
    with atomic_path(out / INFO_FILE) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2))
    return out


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a folder in the hub layout (it has open_clip_config.json)."""
    return (Path(path) / CONFIG_FILE).is_file()


def weights_file(path: str | os.PathLike) -> Optional[Path]:
    """The weights a ``model.pretrained`` path names: the file itself, or an export folder's weights (the
    hub layout's safetensors, else a retired-layout model.pt). None if there are none."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in (WEIGHTS_FILE, RETIRED_FILES[0]):
            if (p / name).is_file():
                return p / name
    return None
