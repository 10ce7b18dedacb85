"""The memory and speed knobs a GPU user of open_clip expects, applied the way open_clip_train applies them.

``model.grad_checkpointing`` (``set_grad_checkpointing``), ``model.patch_dropout`` (FLIP, open_clip's
``force_patch_dropout``), the LiT locks ``model.lock_image*`` / ``model.lock_text*`` (``lock_image_tower``,
``lock_text_tower``: ``requires_grad=False``, so ``weight_decay_groups`` and with it the optimizer and
DeepSpeed never see the frozen weights) and ``run.compile`` (``nn.Module.compile`` in place: no
``_orig_mod.`` key prefix in checkpoints or exports). None of them changes a parameter's name or shape, so
checkpoints and exports are those of the plain model. docs/TRAINING.md, "Memory and speed knobs".
"""
from __future__ import annotations

import logging
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
    resnet = isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name")
    if cfg.patch_dropout > 0 and resnet:
        raise ConfigError(f"{prefix}patch_dropout={cfg.patch_dropout}: {cfg.name} has a ResNet image tower, which "
                          "has no patch tokens to drop (set it to 0)")
    check_model_kwargs(cfg, model_cfg, resnet, prefix)
    if cfg.lock_text and not cfg.lock_text_freeze_layer_norm and not text.get("hf_model_name"):
        raise ConfigError(f"{prefix}lock_text_freeze_layer_norm=false: {cfg.name}'s text tower is open_clip's own "
                          "transformer, which locks its LayerNorms with the rest (set it to true)")


TRAINER_SETS = ("model_name", "model_kwargs", "pretrained", "device", "force_image_size", "aug_cfg",
                "nonscalar_logit_scale", "output_dict")
"""Keywords build_model passes to open_clip itself (from model.name, model.pretrained, run.device,
model.force_image_size, model.aug_scale_min, or fixed): not for ``model.model_kwargs``."""


def check_model_kwargs(cfg: ModelConfig, model_cfg: Dict[str, Any], resnet: bool, prefix: str = "model.") -> None:
    """ConfigError (one line) for a ``model.model_kwargs`` key that open_clip would refuse only once the run
    has started (a TypeError from the model's constructor, an assertion): not a keyword of
    ``open_clip.create_model_and_transforms`` or of the model class, one the trainer or the model config sets
    already, or a ``force_patch_dropout`` outside [0, 1) or on a ResNet image tower."""
    import inspect

    import open_clip

    kwargs = cfg.model_kwargs or {}
    model_class = open_clip.CoCa if "multimodal_cfg" in model_cfg else open_clip.CLIP  # CustomTextCLIP: as CLIP's
    accepted = (set(inspect.signature(open_clip.create_model_and_transforms).parameters)
                | set(inspect.signature(model_class.__init__).parameters)) - {"self", *TRAINER_SETS, *model_cfg}
    for key in sorted(kwargs):
        if key in TRAINER_SETS:
            raise ConfigError(f"{prefix}model_kwargs.{key}: the trainer sets it (see the model.* keys: name, "
                              "pretrained, force_image_size, aug_scale_min; run.device)")
        if key in model_cfg:
            raise ConfigError(f"{prefix}model_kwargs.{key}: set by {cfg.name}'s model config; change it in a "
                              f"model-config JSON (model.config_file) instead")
        if key not in accepted:
            raise ConfigError(f"{prefix}model_kwargs.{key}: not a keyword of open_clip's create_model_and_transforms "
                              f"or {model_class.__name__} (accepted: {', '.join(sorted(accepted))})")
    drop = kwargs.get("force_patch_dropout")
    if drop is not None:
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            raise ConfigError(f"{prefix}model_kwargs.force_patch_dropout must be a number >= 0 and < 1, got {drop!r} "
                              f"(or use {prefix}patch_dropout)")
        if drop > 0 and resnet:
            raise ConfigError(f"{prefix}model_kwargs.force_patch_dropout={drop}: {cfg.name} has a ResNet image "
                              "tower, which has no patch tokens to drop")


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
    _report_locks(model, cfg, prefix)
    return model


def _report_locks(model: torch.nn.Module, cfg: ModelConfig, prefix: str) -> None:
    """One line with the trainable share when a tower is locked, and a warning for a lock setting that does
    nothing (an unlocked count that covers the whole tower, or one given without its lock) or that leaves only
    the logit scale/bias to train."""
    log = logging.getLogger("train")
    ignored = [f"{prefix}{key}" for key, lock in (("lock_image_unlocked_groups", "lock_image"),
                                                  ("lock_text_unlocked_layers", "lock_text"))
               if getattr(cfg, key) and not getattr(cfg, lock)]
    if ignored:
        log.warning("%s set without its lock: ignored", " and ".join(ignored))
    if not (cfg.lock_image or cfg.lock_text):
        return
    params = list(model.named_parameters())
    trainable = [name for name, p in params if p.requires_grad]
    towers = " and ".join(t for t, lock in (("image", cfg.lock_image), ("text", cfg.lock_text)) if lock)
    log.info("model: %d of %d parameter tensors trainable (%.1f%% of the weights), %s tower locked", len(trainable),
             len(params), 100 * sum(p.numel() for _, p in params if p.requires_grad)
             / max(1, sum(p.numel() for _, p in params)), towers)
    if len(trainable) == len(params):
        log.warning("%slock_* set but no parameter is locked: the unlocked groups/layers cover the whole tower", prefix)
    elif all("logit" in name for name in trainable):
        log.warning("only %s remain trainable: both towers are locked", ", ".join(trainable) or "no parameters")


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
