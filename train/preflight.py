"""Checks of a training run that need no model, no DeepSpeed and no process group (a second or two).

``python -m train`` runs them on every rank before anything heavy starts, so a user mistake ends
in one line (printed by rank 0) instead of a traceback per rank; ``python -m train --dry-run`` runs
only them (``make pretrain`` / ``make finetune`` do, before starting torchrun). Each failure is a
:class:`common.config_loader.ConfigError` naming the key to fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.config_loader import ConfigError
from common.shard_folder import read_manifest
from train.config import TrainConfig

SHARDS_HINT = "build it with `make shards` (python -m pipeline demo --out DIR, or python -m pipeline run)"


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Raise ConfigError for the first problem found: batch vs world size, dataset folder, split,
    global batch vs split size, data.partitions vs world size, run.resume, model.pretrained."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    cfg.check_world_size(world_size)
    check_dataset(cfg, world_size)
    check_resume(cfg)
    check_pretrained(cfg)


def check_dataset(cfg: TrainConfig, world_size: int) -> None:
    from train.data import make_order

    data = cfg.data
    try:
        manifest = read_manifest(data.path, dict(data.storage_options or {}))
    except FileNotFoundError:
        if "://" in data.path or data.path.startswith("pipe:"):
            raise ConfigError(f"data.path={data.path}: no manifest.json there (not a finished dataset folder)") from None
        what = "does not exist" if not Path(data.path).exists() else "has no manifest.json (not a finished dataset)"
        raise ConfigError(f"data.path={data.path} {what}: {SHARDS_HINT}") from None
    except (ValueError, KeyError, OSError) as err:  # unreadable or foreign manifest.json, unreachable store
        raise ConfigError(f"data.path={data.path}: cannot read its manifest ({' '.join(str(err).split())})") from None
    splits = [data.split] + ([cfg.logging.eval_split] if cfg.logging.eval_every_steps else [])
    for key, split in zip(("data.split", "logging.eval_split"), splits):
        if split not in manifest.splits:
            raise ConfigError(f"{key}={split}: no such split in {data.path} (has: {', '.join(sorted(manifest.splits))})")
    try:
        order = make_order(manifest, data.split, data.global_batch_size, data.partitions, data.shuffle_window,
                           cfg.run.seed)
        order.rank_streams(0, world_size)
    except ValueError as err:
        size = manifest.split(data.split).num_samples
        raise ConfigError(f"{' '.join(str(err).split())} (split '{data.split}' of {data.path}: {size} samples, "
                          f"data.global_batch_size={data.global_batch_size}, {world_size} ranks)") from None


def check_resume(cfg: TrainConfig) -> None:
    from train.checkpoint import LATEST, complete_checkpoint

    if cfg.run.resume and cfg.run.resume != LATEST:
        try:
            complete_checkpoint(cfg.run.resume)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None


def check_pretrained(cfg: TrainConfig) -> None:
    """A path-like model.pretrained must be a file (anything else is an open_clip tag, which needs network)."""
    weights = cfg.model.pretrained
    if weights and (os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
            and not os.path.isfile(weights):
        hint = ""
        if weights.endswith(os.path.join("export", "model.pt")):
            run_dir = Path(weights).parent.parent
            hint = (f": train it first (make pretrain writes runs/pretrain_cyclip/export/model.pt), or export a "
                    f"checkpoint with python -m train.export {run_dir}")
        raise ConfigError(f"model.pretrained={weights}: no such file{hint}")
