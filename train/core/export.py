"""Export a trained model in open_clip's hub layout (train/model/hub.py).

``RUN_DIR/export/`` holds ``open_clip_config.json`` (model_cfg + preprocess_cfg) and
``open_clip_model.safetensors``, so ``open_clip.create_model_and_transforms("local-dir:RUN_DIR/export")``
returns the trained model with the run's eval preprocessing, for built-in and custom model configs alike;
CLIP_benchmark takes ``--model local-dir:RUN_DIR/export``. The folder is also what fine-tuning configs name as
``model.pretrained`` and what ``python -m train.evaluate --checkpoint`` reads. ``model.pt`` is retired.

    python -m train.export RUN_DIR_or_CHECKPOINT_DIR [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import torch

from common.cli import run_entry_point
from common.errors import EXIT_OK, InputError
from train.config import ModelConfig
from train.model.build import export_config, export_state_dict
from train.model.hub import write_export


def _write(state_dict: dict, out_dir: Path, model: torch.nn.Module, model_cfg: ModelConfig, max_logit_scale: float,
           info: dict) -> Path:
    config = export_config(model, model_cfg)
    return write_export(out_dir, export_state_dict(state_dict, max_logit_scale), config,
                        {"model_name": model_cfg.name, **info})


def export_engine(engine, out_dir: Path, cfg, rank: int, step: int) -> Path | None:
    """Export from a live DeepSpeed engine: the fp32 master weights, on CPU.

    All ranks call it: under ZeRO 1-3 and bf16 the masters are partitioned, and assembling each one is a
    collective. With bf16 weights the module holds rounded copies; the export takes the fp32 masters, so it
    equals ``python -m train.export`` of the checkpoint saved at the same step.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    stage0_masters = _stage0_lowp_masters(engine.optimizer)
    masters = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1-3: assembled from the partitions (a collective)
        if full is None and hasattr(param, "ds_id"):    # ZeRO-3, a locked param (no master): gathered as it is
            full = _gathered(param)
        if full is None:  # stage 0: bf16 params have per-parameter fp32 masters; fp32 params are their own
            full = stage0_masters.get(id(param), param)
        if rank == 0:
            masters[name] = full.detach().float().cpu().clone()
    if rank != 0:
        return None
    state_dict = {}
    for key, value in module.state_dict(keep_vars=True).items():
        state_dict[key] = masters[key] if key in masters else value.detach().float().cpu().clone()
    return _write(state_dict, Path(out_dir), module, cfg.model, cfg.optim.max_logit_scale,
                  {"step": step, "source": "live engine"})


def _gathered(param: torch.nn.Parameter) -> torch.Tensor:
    """A ZeRO-3 parameter's full value, on CPU (a collective: every rank calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().cpu().clone()


def _stage0_lowp_masters(optimizer) -> dict:
    """id(bf16 param) -> its fp32 master, for DeepSpeed's stage-0 bf16 wrapper (FP16_UnfusedOptimizer)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(p): m for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(low, high)}


def _stage0_state_dict(model_states: dict, frozen: frozenset = frozenset()) -> dict:
    """The fp32 weights of a stage-0 checkpoint: the module, with bf16 parameters replaced by the optimizer's
    fp32 masters. Those are stored per param group, in the order of ``train.model.build.weight_decay_groups``,
    which leaves out the ``frozen`` (locked: model.lock_*) parameters; those keep the module's values."""
    from train.model.build import decay_group_names

    state_dict = dict(model_states["module"])
    optimizer = model_states.get("optimizer") or {}
    if "fp32_groups" not in optimizer:
        return state_dict  # fp32 training: the module holds the weights
    skip = set(model_states.get("buffer_names") or []) | set(frozen)
    names = [g for g in decay_group_names([(k, v.ndim) for k, v in state_dict.items() if k not in skip]) if g]
    for group_names, masters in zip(names, optimizer["fp32_groups"]):
        if len(group_names) != len(masters):
            raise ValueError("stage-0 checkpoint: optimizer groups do not match the module's parameters")
        for name, master in zip(group_names, masters):
            state_dict[name] = master
    return state_dict


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Export from a sharded checkpoint folder (or a run folder: its ``latest``), on CPU, in one process."""
    from train.core.checkpoint import LATEST, CheckpointManager

    path = Path(checkpoint)
    if path.name == LATEST and path.is_file():    # RUN_DIR/checkpoints/latest: the checkpoint it names
        path = path.parent / path.read_text().strip()
    if (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    check_export_source(path)
    state = CheckpointManager.load_trainer_state(path)
    cfg = state["config"]
    run_dir = path.parent.parent
    out = Path(out_dir) if out_dir else run_dir / "export"
    model_cfg = ModelConfig(**cfg["model"])
    # The preprocess config is read off a model built as the run built it (random weights: only its config
    # counts), and so are the locked parameters (requires_grad=False).
    from train.model.build import build_model
    from train.model.knobs import frozen_parameter_names

    logging.disable(logging.WARNING)    # open_clip's "initialized randomly": true, and beside the point here
    try:
        model = build_model(dataclasses.replace(model_cfg, pretrained=None))[0]
    finally:
        logging.disable(logging.NOTSET)
    # DeepSpeed pickles config objects into its model files, so weights_only=True cannot read them; they are
    # our own run's files, not downloaded ones.
    model_file = path / "mp_rank_00_model_states.pt"
    if any(path.glob("*zero_pp_rank_*_optim_states.pt")) and cfg["zero"]["stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        missing = set(model.state_dict()) - set(state_dict)
        if missing and model_file.is_file():    # ZeRO-1 saves no locked params for zero_to_fp32: the module's
            module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
            state_dict.update({k: module[k] for k in missing if k in module and module[k].numel()})
    else:  # ZeRO stage 0: rank 0's model file holds the full weights
        state_dict = _stage0_state_dict(torch.load(model_file, map_location="cpu", weights_only=False),
                                        frozenset(frozen_parameter_names(model)))
    return _write(state_dict, out, model, model_cfg, cfg["optim"]["max_logit_scale"],
                  {"step": state["step"], "source": str(path)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run folder (exports its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    args = parser.parse_args(argv)

    def export(_argv) -> int:
        print(export_checkpoint(args.path, args.out))
        return EXIT_OK

    return run_entry_point(export)    # a wrong path: one line, exit 2


def check_export_source(path: Path) -> None:
    """InputError (one line) unless ``path`` is a run folder with a complete checkpoint or a checkpoint folder."""
    from train.core.checkpoint import LATEST, TRAINER_STATE

    if not path.exists():
        raise InputError(f"{path}: no such run or checkpoint folder")
    if not path.is_dir():
        raise InputError(f"{path} is a file: give a run folder (RUN_DIR, its latest checkpoint is exported) "
                          "or a checkpoint folder (RUN_DIR/checkpoints/step_N)")
    if not (path / TRAINER_STATE).is_file():
        raise InputError(f"{path}: neither a checkpoint folder (no {TRAINER_STATE}) nor a run folder with a "
                          f"complete checkpoint (no checkpoints/{LATEST}): train it first, or name a checkpoint")
