"""The memory and speed knobs a GPU user of open_clip expects, applied the way open_clip_train applies them.

``model.grad_checkpointing`` (``set_grad_checkpointing``), ``model.patch_dropout`` (FLIP, open_clip's
``force_patch_dropout``), the LiT locks ``model.lock_image*`` / ``model.lock_text*`` (``lock_image_tower``,
``lock_text_tower``: ``requires_grad=False``, so ``weight_decay_groups`` and with it the optimizer and
DeepSpeed never see the frozen weights) and ``run.compile`` (``nn.Module.compile`` in place: no
``_orig_mod.`` key prefix in checkpoints or exports). None of them changes a parameter's name or shape, so
checkpoints and exports are those of the plain model. docs/TRAINING.md, "Memory and speed knobs".
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from common.errors import ConfigError
from train.config import ModelConfig


def create_kwargs(cfg: ModelConfig) -> Dict[str, Any]:
    """Keywords for ``open_clip.create_model_and_transforms`` that the knobs add (patch dropout). Kept apart
    from ``model.model_kwargs`` so the export's architecture (train/model/hub.py) does not carry them: patch
    dropout is a training-time choice, and without it a loaded export has no PatchDropout module at all."""
    return {"force_patch_dropout": cfg.patch_dropout} if cfg.patch_dropout > 0 else {}


def check_knobs(cfg: ModelConfig, model_cfg: Dict[str, Any], prefix: str = "model.") -> None:
    """ConfigError (one line) for a knob the architecture ``model_cfg`` (open_clip's config dict of
    ``cfg.name``) cannot honour: patch dropout of a ResNet image tower (no patch tokens), or
    ``lock_text_freeze_layer_norm=false`` for open_clip's own text transformer (it asserts true)."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if cfg.patch_dropout > 0 and isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name"):
        raise ConfigError(f"{prefix}patch_dropout={cfg.patch_dropout}: {cfg.name} has a ResNet image tower, which "
                          "has no patch tokens to drop (set it to 0)")
    if cfg.lock_text and not cfg.lock_text_freeze_layer_norm and not text.get("hf_model_name"):
        raise ConfigError(f"{prefix}lock_text_freeze_layer_norm=false: {cfg.name}'s text tower is open_clip's own "
                          "transformer, which locks its LayerNorms with the rest (set it to true)")


def apply_model_knobs(model: torch.nn.Module, cfg: ModelConfig, prefix: str = "model.") -> torch.nn.Module:
    """Gradient checkpointing and the LiT locks of ``cfg`` on ``model`` (an open_clip CLIP / CustomTextCLIP),
    in place, after its weights are loaded (``freeze_bn_stats`` freezes the loaded statistics). Returns it.
    Raises ConfigError (one line) where open_clip refuses a lock setting."""
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        try:
            model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers,
                                  freeze_layer_norm=cfg.lock_text_freeze_layer_norm)
        except AssertionError as err:    # open_clip's text transformer: "Unfreezing LayerNorm is not supported"
            raise ConfigError(f"{prefix}lock_text_freeze_layer_norm={cfg.lock_text_freeze_layer_norm}: "
                              f"{' '.join(str(err).split()) or 'refused by open_clip'}") from None
    return model


def compile_module(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``run.compile``: ``module.compile(backend=backend)`` in place (torch >= 2.2; a DeepSpeed engine's own
    ``compile`` compiles its module the same way). Unlike ``torch.compile(module)`` it wraps nothing, so
    ``state_dict`` keys stay plain. Compilation happens at the first forward, and again for each new input
    shape or mode (train/eval, grad/no-grad). Returns ``module``."""
    module.compile(backend=backend)
    return module


def frozen_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names of the parameters with ``requires_grad=False`` (the locked ones), in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]
