"""open_clip models for the trainer: by name or by model-config file, with optional initial weights."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from train.config import CONFIG_DIR, ModelConfig
from train.model.knobs import apply_model_knobs, create_kwargs
from train.model.hub import CONFIG_FILE as EXPORT_CONFIG, export_model_cfg, hub_config, is_export_dir, weights_file


def register_model_configs(config_file: Optional[str] = None) -> None:
    """Make this project's model configs (and ``config_file``) known to open_clip by name."""
    import open_clip

    if str(CONFIG_DIR) not in [str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(CONFIG_DIR)
    if config_file:
        open_clip.add_model_config(Path(config_file))


def model_config_dict(name: str) -> dict:
    """The resolved open_clip model-config dict of a (registered) model name."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{name}' (known: built-ins and {CONFIG_DIR})")
    return cfg


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Tuple[torch.nn.Module, Any, Any, Any]:
    """Create ``(model, train_transform, eval_transform, tokenizer)``.

    The model has a 1-element logit_scale (``nonscalar_logit_scale=True``) because DeepSpeed cannot
    flatten 0-dim parameters. ``pretrained`` that names an existing file or an export folder
    (train/model/hub.py) is loaded with ``weights_only=True`` (open_clip converts the scalar logit_scale of
    exported files); anything else is passed to open_clip as a pretrained tag (needs network or open_clip's
    cache). An export whose architecture or preprocessing differs from ``cfg``'s (another image size, mean or
    std) is loaded into ``cfg``'s model, as configured, with a warning naming the differences. The knobs
    (train/model/knobs.py) are applied: patch dropout, gradient checkpointing, the LiT locks (locked
    parameters have ``requires_grad=False``); ConfigError (one line) where open_clip refuses a lock setting.
    """
    import open_clip

    name = cfg.name
    if cfg.config_file:
        register_model_configs(cfg.config_file)
        name = Path(cfg.config_file).stem  # what open_clip registered it as (ModelConfig sets name to it too)
    else:
        register_model_configs()
    local_weights = weights_file(cfg.pretrained) if cfg.pretrained else None    # a file, or an export folder's
    tag = None if local_weights or not cfg.pretrained else cfg.pretrained
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(
        name, pretrained=tag, device=device, force_image_size=cfg.force_image_size,
        aug_cfg={"scale": (cfg.aug_scale_min, 1.0)}, nonscalar_logit_scale=True, **create_kwargs(cfg),
        **cfg.model_kwargs)
    if local_weights:
        # to CPU first (safetensors takes a device string, not a torch.device); load_state_dict copies to device
        open_clip.load_checkpoint(model, str(local_weights), weights_only=True, device="cpu")
        if is_export_dir(local_weights.parent):
            warn_if_export_differs(local_weights.parent, model, cfg)
    apply_model_knobs(model, cfg)    # after the weights: freeze_bn_stats freezes the loaded statistics
    tokenizer = open_clip.get_tokenizer(name)
    return model, train_transform, eval_transform, tokenizer


def warn_if_export_differs(export: Path, model: torch.nn.Module, cfg: ModelConfig) -> list:
    """Log a warning for each key of the export's open_clip_config.json that the model built from ``cfg``
    does not share (e.g. fine-tuning at 32 px from a 48 px export); returns those keys."""
    saved = json.loads((export / EXPORT_CONFIG).read_text())
    now = export_config(model, cfg)
    diffs = [f"{section}.{key}: {saved[section].get(key)} in the export, {now[section].get(key)} here"
             for section in ("model_cfg", "preprocess_cfg")
             for key in sorted(set(saved.get(section, {})) | set(now[section]))
             if _plain(saved.get(section, {}).get(key)) != _plain(now[section].get(key))]
    for line in diffs:
        logging.getLogger("train").warning("model.pretrained=%s: %s (set model.* to keep the export's)", export, line)
    return diffs


def _plain(value):
    """JSON-comparable (tuples as lists)."""
    return json.loads(json.dumps(value))


def _decays(pname: str, ndim: int) -> bool:
    return not (ndim < 2 or "bias" in pname or "logit_scale" in pname or ".ln" in pname or "bn" in pname)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW param groups: no decay for gains, biases, norms, embeddings of ndim < 2 and logit_scale."""
    params = {pname: p for pname, p in model.named_parameters() if p.requires_grad}
    decay, no_decay = decay_group_names([(pname, p.ndim) for pname, p in params.items()])
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def decay_group_names(named_ndims: list) -> tuple:
    """(names with weight decay, names without), each in the given order: the optimizer's two param groups."""
    decay = [name for name, ndim in named_ndims if _decays(name, ndim)]
    return decay, [name for name, ndim in named_ndims if not _decays(name, ndim)]


def export_state_dict(state_dict: Dict[str, torch.Tensor], max_logit_scale: float) -> Dict[str, torch.Tensor]:
    """A plain open_clip state dict: no wrapper prefixes, fp32, scalar logit_scale clamped like training."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        out[key] = value.detach().float().cpu().clone()
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(()).clamp(max=torch.log(torch.tensor(max_logit_scale)))
    if "logit_bias" in out:
        out["logit_bias"] = out["logit_bias"].reshape(())
    return out


def export_config(model: torch.nn.Module, cfg: ModelConfig) -> dict:
    """``open_clip_config.json`` of a model built from ``cfg``: its architecture as trained (force_image_size and
    model_kwargs applied) and its eval preprocessing (train/model/hub.py)."""
    if cfg.config_file:
        register_model_configs(cfg.config_file)
    else:
        register_model_configs()
    return hub_config(model, export_model_cfg(model_config_dict(cfg.name), cfg.force_image_size, cfg.model_kwargs))
