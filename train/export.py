"""Export a trained model as a plain open_clip state dict.

``RUN_DIR/export/model.pt`` loads with ``open_clip.create_model_and_transforms(name, pretrained=path)``
(register this project's configs first: ``train.model.register_model_configs()``), and is the
``model.pretrained`` of fine-tuning configs. ``model_config.json`` beside it is the pure open_clip
config (``open_clip.add_model_config`` registers it as "model_config"); ``info.json`` names the model.

    python -m train.export RUN_DIR_or_CHECKPOINT_DIR [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from train.model import export_state_dict, register_model_configs, write_model_config

MODEL_FILE = "model.pt"


def _write(state_dict: dict, out_dir: Path, model_name: str, config_file, max_logit_scale: float, info: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    register_model_configs(config_file)
    tmp = out_dir / f".{MODEL_FILE}.tmp{os.getpid()}"
    torch.save(export_state_dict(state_dict, max_logit_scale), tmp)
    os.replace(tmp, out_dir / MODEL_FILE)
    write_model_config(out_dir / "model_config.json", model_name)
    (out_dir / "info.json").write_text(json.dumps({"model_name": model_name, **info}, indent=2))
    return out_dir / MODEL_FILE


def export_engine(engine, out_dir: Path, cfg, rank: int, step: int) -> Path | None:
    """Export from a live DeepSpeed engine (all ranks call it; ZeRO-3 gathers the partitioned weights)."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = cfg.zero.stage == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather):
        if rank != 0:
            return None
        state_dict = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return _write(state_dict, Path(out_dir), cfg.model.name, cfg.model.config_file, cfg.optim.max_logit_scale,
                  {"step": step, "source": "live engine"})


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Export from a sharded checkpoint folder (or a run folder: its ``latest``), on CPU, in one process."""
    from train.checkpoint import LATEST, CheckpointManager

    path = Path(checkpoint)
    if (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    state = CheckpointManager.load_trainer_state(path)
    cfg = state["config"]
    if any(path.glob("*zero_pp_rank_*_optim_states.pt")) and cfg["zero"]["stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:  # ZeRO stage 0: rank 0's model file holds the full weights. DeepSpeed pickles config objects
        # into it, so weights_only=True cannot read it; it is our own run's file, not a downloaded one.
        state_dict = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    run_dir = path.parent.parent
    out = Path(out_dir) if out_dir else run_dir / "export"
    return _write(state_dict, out, cfg["model"]["name"], cfg["model"]["config_file"], cfg["optim"]["max_logit_scale"],
                  {"step": state["step"], "source": str(path)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run folder (exports its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.path, args.out))


if __name__ == "__main__":
    main()
