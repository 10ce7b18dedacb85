"""Checks of a training run that need no model, no DeepSpeed and no process group (a second or two).

``python -m train`` runs them on every rank before anything heavy starts, so a user mistake ends
in one line (printed by rank 0) instead of a traceback per rank; ``python -m train --dry-run`` runs
only them (``make pretrain`` / ``make finetune`` do, before starting torchrun). Each failure is a
:class:`common.config_loader.ConfigError` naming the key to fix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from common.config_loader import flat_fields, to_dict
from common.errors import ConfigError, InputError
from common.shard_folder import Manifest, read_manifest
from train.config import TrainConfig
from train.model.hub import WEIGHTS_FILE, is_export_dir, weights_file

SHARDS_HINT = ("build it with `make shards` (python -m pipeline demo --out DIR, or python -m pipeline run), or index "
               "shards you already have with python -m pipeline index --shards SPEC --out DIR")


# The keys that define a run: run.resume=latest refuses to continue this run's checkpoint when one of them
# (or anything under a listed section) differs from the checkpoint's config. Free to change on a resume:
# optim.steps (extending a run), optim.max_nonfinite_steps and optim.fused_adamw (safety knob and kernel
# choice), data.accum_freq (feature caching keeps the gradient of the whole batch), zero.stage 1 <-> 2
# (check_resume refuses other changes), the world size (elastic resume), where the data is (check_same_data
# compares the data itself), data.num_workers/cache_*/retries/storage_options, model.config_file (its stem
# is model.name, compared), model.grad_checkpointing and run.compile* (the same math: memory and speed only),
# checkpoint.*, logging.*, run.device/run_dir/stop_after_steps. model.patch_dropout and model.lock_* are compared.
RESUME_KEYS = ("model.", "loss.", "optim.", "data.path", "data.sources", "data.split", "data.global_batch_size",
               "data.streams", "data.shuffle_window", "run.seed", "zero.precision", "zero.bf16_mode")
RESUME_FREE = ("optim.steps", "optim.max_nonfinite_steps", "optim.fused_adamw", "model.config_file",
               "model.grad_checkpointing")


def preflight(cfg: TrainConfig, world_size: int, device: bool = True) -> Optional[dict]:
    """Raise ConfigError for the first problem found: batch vs world size, dataset folder, split,
    global batch vs split size, data.streams vs world size, run.run_dir, run.resume (and, for
    run.resume=latest, a changed run-defining key), model.name, model.pretrained.

    Returns {step, message} when run.resume=latest finds this run already finished (nothing to do), else None.
    ``device`` False skips run.device (a submit host need not have the compute nodes' GPUs)."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    cfg.check_world_size(world_size)
    check_dataset(cfg, world_size)
    check_zeroshot_sets(cfg)
    check_run_dir(cfg)
    if device:
        check_device(cfg.run.device)
    finished = check_resume(cfg)
    check_model(cfg)
    check_pretrained(cfg)
    return finished


def check_zeroshot_sets(cfg: TrainConfig) -> None:
    """Each logging.zeroshot set must open (either format) and be a classification set with class names."""
    from train.evaluate.core import templates_for
    from train.evaluate.data import fill_template
    from train.evaluate.datasets import open_eval_set

    for i, zs in enumerate(cfg.logging.zeroshot):
        what = f"logging.zeroshot[{i}].path"
        eval_set = open_eval_set(zs.path, zs.split, what, zs.storage_options or None)
        if eval_set.task == "retrieval" or not eval_set.classnames:
            raise InputError(f"{what}={zs.path}: not a classification set (it needs class names: classnames.txt "
                             f"beside it{'; this is a retrieval set' if eval_set.task == 'retrieval' else ''})")
        for template in templates_for(zs.templates, eval_set):    # a bad {...} fails here, not at its first step
            fill_template(template, eval_set.classnames[0])


def check_run_dir(cfg: TrainConfig) -> None:
    path = Path(cfg.run.run_dir)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"run.run_dir={cfg.run.run_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"run.run_dir={cfg.run.run_dir}: {parent} is not writable")
            return


def check_dataset(cfg: TrainConfig, world_size: int) -> None:
    """One line for a dataset (each source of a mixture) that is not there, lacks a split, or cannot share its
    global batch among ``world_size`` ranks."""
    from train.data.mixture import make_data_order

    data, manifests = cfg.data, []
    sources = data.datasets()
    for i, src in enumerate(sources):
        key = f"data.sources[{i}].path" if data.sources else "data.path"
        manifests.append(_read_dataset(src.path, key, data.storage_options))
        splits = [("data.split" if not data.sources else f"data.sources[{i}].split", src.split)]
        if cfg.logging.eval_every_steps and i == 0:
            splits.append(("logging.eval_split", cfg.logging.eval_split))
        for split_key, split in splits:
            if split not in manifests[-1].splits:
                raise ConfigError(f"{split_key}={split}: no such split in {src.path} "
                                  f"(has: {', '.join(sorted(manifests[-1].splits))})")
    try:
        order = make_data_order(manifests, data, cfg.run.seed)
        order.rank_streams(0, world_size)
    except ValueError as err:
        sizes = ", ".join(f"split '{s.split}' of {s.path}: {m.split(s.split).num_samples} samples"
                          for s, m in zip(sources, manifests))
        raise ConfigError(f"{' '.join(str(err).split())} ({sizes}, data.global_batch_size={data.global_batch_size}, "
                          f"{world_size} ranks)") from None


def _read_dataset(path: str, key: str, storage_options) -> Manifest:
    try:
        return read_manifest(path, dict(storage_options or {}))
    except FileNotFoundError:
        if "://" in path or path.startswith("pipe:"):
            raise InputError(f"{key}={path}: no manifest.json there (not a finished dataset folder)") from None
        what = "does not exist" if not Path(path).exists() else "has no manifest.json (not a finished dataset)"
        raise InputError(f"{key}={path} {what}: {SHARDS_HINT}") from None
    except (ValueError, KeyError, OSError) as err:  # unreadable or foreign manifest.json, unreachable store
        raise InputError(f"{key}={path}: cannot read its manifest ({' '.join(str(err).split())})") from None


def check_resume(cfg: TrainConfig) -> Optional[dict]:
    """run.resume against RUN_DIR's checkpoints, or (checkpoint.remote, no local checkpoint) the remote's latest.
    run.resume='' refuses a checkpoint.remote that already holds checkpoints; 'none' starts over (the remote's
    checkpoints are replaced from this run's first upload on)."""
    from train.core.checkpoint import (FRESH, LATEST, TRAINER_STATE, CheckpointManager, complete_checkpoint,
                                       latest_checkpoint)
    from train.core.remote_checkpoint import checked_pointer, checked_remote

    remote = checked_remote(cfg.checkpoint)
    if cfg.run.resume.lower() in FRESH:
        pointer = checked_pointer(remote) if remote is not None and cfg.run.resume == "" else None
        if pointer is not None:
            raise InputError(f"checkpoint.remote={cfg.checkpoint.remote} already holds checkpoints (latest "
                             f"{pointer['latest']}): run.resume=latest continues them, run.resume=none starts over "
                             "and replaces them, or use another checkpoint.remote")
        return None
    if cfg.run.resume != LATEST:  # an explicit checkpoint (e.g. fine-tuning from another run): not compared
        try:
            complete_checkpoint(cfg.run.resume)
        except FileNotFoundError as err:
            raise InputError(str(err)) from None
        return None
    latest = latest_checkpoint(cfg.run.run_dir)
    load, where = (lambda: CheckpointManager.load_trainer_state(latest)), cfg.run.run_dir
    if latest is None and remote is not None:  # a fresh node: the trainer will download the remote's latest
        pointer = checked_pointer(remote)
        if pointer is not None:
            latest = where = f"{remote.url}/checkpoints/{pointer['latest']}"
            load = lambda: remote.load_torch(pointer["latest"], TRAINER_STATE)  # noqa: E731
    if latest is None:
        return None
    try:
        saved = load()
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise InputError(f"run.resume=latest: {latest} is unreadable ({' '.join(str(err).split())[:200]}); "
                          "use a new run.run_dir, or run.resume=none to start over in this one") from None
    changed = changed_run_keys(saved.get("config", {}), to_dict(cfg))
    if changed:
        raise ConfigError(f"run.resume=latest: {where} was trained with other settings "
                          f"({'; '.join(changed)}); use a new run.run_dir, or run.resume=none to start over in "
                          "this one, or pass the old values to continue it")
    check_same_data(cfg, saved, where)
    was = saved.get("config", {}).get("zero", {}).get("stage", cfg.zero.stage)
    if was != cfg.zero.stage and {was, cfg.zero.stage} != {1, 2}:  # ZeRO-1 and -2 save the same partitions
        raise ConfigError(f"run.resume=latest: {where} was trained with zero.stage={was}, whose checkpoint "
                          f"zero.stage={cfg.zero.stage} cannot load (only 1 <-> 2 may change on resume): resume with "
                          f"zero.stage={was}, or export it (python -m train.export) and fine-tune from the export")
    step = int(saved.get("step", 0))
    exported = not cfg.checkpoint.export or is_export_dir(Path(cfg.run.run_dir) / "export")
    if step >= cfg.optim.steps and exported:  # (without its export the trainer starts, to write it)
        return {"step": step, "message": f"run already finished at step {step} (optim.steps={cfg.optim.steps}) in "
                f"{cfg.run.run_dir}: nothing to train; raise optim.steps to extend it, or use a new run.run_dir"}
    return None


def check_same_data(cfg: TrainConfig, saved: dict, where: str) -> None:
    """The dataset's identity, not its path's spelling: where data.path (or a source's path) is written otherwise
    than in the checkpoint (relative, through a link, the same shards copied elsewhere), the order this run would
    read (``shards_sha1`` of each split: shard names, counts, checksums; and sizes, batch, streams, seed) must be
    the checkpoint's. ConfigError (one line) when it is other data."""
    from train.data.mixture import make_data_order

    old = [s.get("path") for s in saved.get("config", {}).get("data", {}).get("sources") or []] or \
        [saved.get("config", {}).get("data", {}).get("path")]
    new = [src.path for src in cfg.data.datasets()]
    order = (saved.get("states", {}).get("data") or {}).get("order")
    if old == new or order is None:
        return
    manifests = [_read_dataset(src.path, "data.path", cfg.data.storage_options) for src in cfg.data.datasets()]
    try:
        make_data_order(manifests, cfg.data, cfg.run.seed).check_resume(order)
    except ValueError as err:
        raise ConfigError(f"run.resume=latest: {where} was trained on {', '.join(map(str, old))}, and "
                          f"{', '.join(new)} holds other data ({' '.join(str(err).split())})") from None


def changed_run_keys(saved: dict, current: dict) -> list:
    """'key: old -> new' for every run-defining key (RESUME_KEYS) whose value differs from the saved config.
    Dataset locations are left to check_same_data (the data's identity, not the path's spelling)."""
    old, new = flat_fields(_without_paths(saved)), flat_fields(_without_paths(current))
    # A checkpoint written before a key was renamed holds the old name: compare it under the new one.
    old.update({renamed: old.pop(key) for key, renamed in TrainConfig.RENAMED.items() if key in old})
    defining = lambda k: any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_KEYS)  # noqa: E731
    keys = [k for k in new if k in old and k not in RESUME_FREE and defining(k)]
    return [f"{k}: {old[k]} -> {new[k]}" for k in keys if old[k] != new[k]]


def _without_paths(config: dict) -> dict:
    data = dict(config.get("data") or {})
    data.pop("path", None)
    if data.get("sources"):
        data["sources"] = [{k: v for k, v in src.items() if k != "path"} for src in data["sources"]]
    return {**config, "data": data}


def check_model(cfg: TrainConfig) -> None:
    """model.name must be an open_clip model or a configs/model/ stem, whose architecture takes the knobs set
    (train/model/knobs.py: patch dropout needs patch tokens, a LayerNorm left unlocked a Hugging Face text tower)."""
    import open_clip

    from train.model.build import CONFIG_DIR, register_model_configs

    register_model_configs(cfg.model.config_file)
    if open_clip.get_model_config(cfg.model.name) is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"model.name={cfg.model.name}: not an open_clip model (this project's: {', '.join(ours)}; "
                          "open_clip's: open_clip.list_models()), or set model.config_file to a model-config JSON")
    from train.model.knobs import check_knobs

    check_knobs(cfg.model, open_clip.get_model_config(cfg.model.name))


def check_pretrained(cfg: TrainConfig) -> None:
    """A path-like model.pretrained must be a weights file or an export folder (train/model/hub.py); anything
    else is an open_clip tag, which needs network."""
    weights = cfg.model.pretrained
    pathlike = weights and (os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
                            or os.path.isdir(weights))
    if pathlike and weights_file(weights) is None:
        hint = ""
        parts = Path(weights).parts
        if "export" in parts[-2:]:
            run_dir = Path(*parts[:parts.index("export")]) if parts.index("export") else Path(".")
            hint = (f": train it first (make pretrain writes runs/pretrain_cyclip/export/), or export a "
                    f"checkpoint with python -m train.export {run_dir}")
        what = f"no weights in this folder (no {WEIGHTS_FILE})" if os.path.isdir(weights) else "no such file or export folder"
        raise InputError(f"model.pretrained={weights}: {what}{hint}")
    if pathlike:
        check_weights_file(str(weights_file(weights)))
    elif weights:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(cfg.model.name)
        if weights not in tags:
            raise ConfigError(f"model.pretrained={weights}: not a file, nor a pretrained tag open_clip knows for "
                              f"{cfg.model.name} (its tags: {', '.join(tags) or 'none'})")


def check_weights_file(weights: str) -> None:
    """The file must load as a state dict (memory-mapped: no copy of a large file is read)."""
    import torch

    try:
        if weights.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                state = {key: None for key in f.keys()}
        else:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # legacy (non-zip) torch.save files cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the file is, it is not weights torch can load
        raise InputError(f"model.pretrained={weights}: not a weights file torch can load "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:150]})") from None
    if not isinstance(state, dict) or not state:
        raise InputError(f"model.pretrained={weights}: holds a {type(state).__name__}, not a state dict")


def check_device(wanted: str, local_rank: Optional[int] = None) -> None:
    """``run.device`` names a device this process can use: 'cuda' needs a visible GPU for its local rank
    (LOCAL_RANK, default 0). Raises ConfigError (one line) before DeepSpeed starts, in ``--dry-run`` too."""
    if wanted != "cuda":
        return  # 'cpu' always exists; 'auto' falls back to the CPU
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) if local_rank is None else local_rank
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{count} CUDA GPU(s) visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        raise ConfigError(f"run.device=cuda but {seen}, and local rank {local_rank} needs GPU {local_rank}: "
                          "use run.device=cpu (or auto), or run on a node with enough GPUs")
