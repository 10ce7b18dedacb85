"""Eval inputs: samples read in order from a shard folder, models loaded from checkpoints, and encoders.

Everything here is model-agnostic: it needs only ``encode_image`` / ``encode_text`` on the model, an
eval transform (PIL → tensor) and a tokenizer (list of str → token tensor), the open_clip interface.
"""
from __future__ import annotations

import json
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from common.shard_folder import (READABLE_COMPRESSIONS, ShardFormatError, compression_of, dotted_key_error, dotted_key_member,
                                 load_sample_index, locate, read_manifest, unreadable_compression)
from train.data.decode import decode_image, find_member, image_member
from train.data.shard_source import KEY_EXT, is_remote, open_remote

from .corruptions import corrupt
from .config import EvalInputError


class EmptySplitError(ValueError):
    """encode_images was given no images."""


@dataclass
class Sample:
    key: str
    image: Image.Image
    label: Optional[int]
    caption: Optional[str]
    captions: Optional[List[str]] = None
    """All captions of the image where a dataset has several (CLIP_benchmark retrieval sets); else None."""


def iter_samples(folder: str | Path, split: str, max_samples: int = 0,
                 storage_options: Optional[dict] = None) -> Iterator[Sample]:
    """Samples of ``split`` in shard order (deterministic: no shuffling, one process).

    ``folder`` is anything the trainer reads (a folder, an http(s)/s3/gs URL, a ``pipe:`` command);
    remote shards are streamed, not cached. The image member and its decoding are the trainer's
    (train.data.decode: the manifest's ``fields['image']``, else another image extension, in any case;
    16-bit greyscale scaled to 8 bits). A damaged shard raises: evaluation numbers must not silently shrink.
    """
    manifest = read_manifest(folder, storage_options)
    image_ext = manifest.fields.get("image", "jpg")
    caption_ext = manifest.fields.get("caption", "txt")
    meta_ext = manifest.fields.get("metadata", "json")
    count = 0
    for url, shard in zip(manifest.shard_paths(split), manifest.split(split).shards):
        in_shard = 0
        for raw in _tar_samples(url, storage_options, _kept_starts(manifest, shard, storage_options)):
            if max_samples and count >= max_samples:
                return
            count += 1
            in_shard += 1
            ext, meta_key, caption_key = (image_member(raw, image_ext), find_member(raw, meta_ext),
                                          find_member(raw, caption_ext))
            if ext is None:
                raise ValueError(f"sample {raw['__key__']} in {url} has no image ({sorted(raw)})")
            meta = json.loads(raw[meta_key]) if meta_key else {}
            caption = raw[caption_key].decode("utf-8") if caption_key else meta.get("caption")
            image = decode_image(raw[ext])
            label = meta.get("label")
            yield Sample(key=raw["__key__"], image=image, label=None if label is None else int(label),
                         caption=caption)
        if in_shard != shard.num_samples:    # a truncated tar can end "cleanly" at a member boundary
            raise EvalInputError(f"shard {url} holds {in_shard} samples, its manifest.json says {shard.num_samples}: "
                                 "it is damaged or was replaced; restore it or rebuild the dataset")


def _kept_starts(manifest, shard, storage_options: Optional[dict]) -> Optional[set]:
    """The start bytes of the samples a shard's sample index lists, when the index keeps only some of them (an
    index made with ``python -m pipeline index --subset``); None: every sample of the tar counts."""
    if not shard.index:
        return None
    location = locate(manifest.root, shard.index)
    try:
        if is_remote(location):
            with open_remote(location, storage_options) as f:
                rows = load_sample_index(f.read())
        else:
            rows = load_sample_index(Path(location).read_bytes())
    except (OSError, ValueError) as err:
        raise EvalInputError(f"sample index {location} cannot be read ({err}): restore it or rebuild the "
                             "dataset") from None
    return None if len(rows) != shard.num_samples else set(int(start) for start in rows[:, 0])


def _tar_samples(url: str, storage_options: Optional[dict], starts: Optional[set] = None) -> Iterator[dict]:
    """{'__key__': key, ext: bytes} per sample of one tar, streamed in order (WebDataset grouping); with
    ``starts``, only the samples whose first member's header begins at one of those bytes.

    EvalInputError naming the shard if it is missing, unreadable or not a complete tar, compressed other than
    with gzip, bzip2 or xz (which are read), or its members ran together (keys with dots: the rule in
    common.shard_folder.dotted_key_member): evaluation never skips samples (its numbers would silently cover
    less of the split).
    """
    try:
        for start, sample in _read_tar(url, storage_options):
            dotted = dotted_key_member([k for k in sample if k != "__key__"])
            if dotted is not None:
                raise dotted_key_error(url, sample["__key__"], dotted)
            if starts is None or start in starts:
                yield sample
    except ShardFormatError as err:
        raise EvalInputError(str(err)) from None
    except tarfile.ReadError as err:
        compression = _compression(url, storage_options)
        if compression and compression not in READABLE_COMPRESSIONS:  # (zstd): say so, not "invalid header"
            raise EvalInputError(str(unreadable_compression(url, compression))) from None
        raise EvalInputError(f"shard {url} cannot be read (ReadError: {' '.join(str(err).split())[:200]}): "
                             "restore it or rebuild the dataset") from None
    except (OSError, tarfile.TarError, EOFError) as err:
        what = "is missing" if isinstance(err, FileNotFoundError) else "cannot be read"
        raise EvalInputError(f"shard {url} {what} ({type(err).__name__}: {' '.join(str(err).split())[:200]}): "
                             "restore it or rebuild the dataset") from None


def _compression(url: str, storage_options: Optional[dict]) -> str:
    try:
        with open_remote(url, storage_options) if is_remote(url) else open(url, "rb") as f:
            return compression_of(f.read(6))
    except Exception:  # noqa: BLE001 - unreadable: the caller's own message stands
        return ""


def _read_tar(url: str, storage_options: Optional[dict]) -> Iterator[Tuple[int, dict]]:
    """(start byte of its first member's header, sample) per sample of one tar, streamed."""
    stream = open_remote(url, storage_options) if is_remote(url) else open(url, "rb")
    sample: dict = {}
    start = 0
    with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            match = KEY_EXT.match(member.name) if member.isfile() else None
            if match is None:
                continue
            key = os.path.basename(match.group(1))
            if sample and sample["__key__"] != key:
                yield start, sample
                sample = {}
            if not sample:
                start = member.offset
            sample["__key__"] = key
            sample[match.group(2).lower()] = tar.extractfile(member).read()    # as webdataset
    if sample:
        yield start, sample


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, transform: Callable, samples: Iterator[Sample], batch_size: int = 256,
                  corruption: str = "", severity: int = 0) -> torch.Tensor:
    """L2-normalised image embeddings (float32, on CPU), optionally of corrupted copies of the images."""
    device, feats, batch = _device_of(model), [], []

    def flush():
        x = torch.stack(batch).to(device)
        feats.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
        batch.clear()

    for s in samples:
        img = corrupt(s.image, corruption, severity, s.key) if corruption else s.image
        batch.append(transform(img.convert("RGB")))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise EmptySplitError("no images to encode (empty split?)")
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (float32, on CPU)."""
    device, feats = _device_of(model), []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_weights(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                      batch_size: int = 256) -> torch.Tensor:
    """One unit vector per class: the renormalised mean of its prompt embeddings (the prompt ensemble; CLIP,
    Radford et al. 2021, and CLIP_benchmark's zero_shot_classifier). A template names the class as ``{}`` or, in
    CLIP_benchmark's files, ``{c}``."""
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    feats = encode_texts(model, tokenizer, prompts, batch_size).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def fill_template(template: str, classname: str) -> str:
    """``template`` with the class name in its ``{}`` or ``{c}`` slot; EvalInputError for any other ``{...}``."""
    try:
        return template.format(classname, c=classname)
    except (KeyError, IndexError, ValueError) as err:
        raise EvalInputError(f"template {template!r}: only '{{}}' or '{{c}}' may stand for the class name "
                             f"({type(err).__name__}: {err}); write a literal brace as '{{{{' or '}}}}'") from None


def logit_scale_of(model) -> float:
    """exp(logit_scale) of an open_clip model (1/0.07-initialised, clamped to 100 in training)."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp().reshape(-1)[0]) if scale is not None else 100.0


# ---- models ---------------------------------------------------------------------------------------

def _register_config(name: str, model_cfg: dict) -> None:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="eval_model_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(folder)


def resolve_model_name(config_json: dict, fallback: str) -> str:
    """The open_clip name for an exported config: a named builtin, or a custom config registered here.

    Accepted layouts: ``{"model_name": ..., "model_cfg": {...}}`` (open_clip hub style, model_cfg
    optional), ``{"model_name": ...}`` alone, or a bare model config ``{"embed_dim", "vision_cfg", ...}``.
    """
    name = config_json.get("model_name") or config_json.get("name") or fallback
    model_cfg = config_json.get("model_cfg")
    if model_cfg is None and "embed_dim" in config_json:
        model_cfg = {k: v for k, v in config_json.items() if k not in ("model_name", "name")}
    if model_cfg is not None:
        _register_config(name, model_cfg)
    return name


def _export_folder(path: Path) -> Tuple[Path, Optional[Path]]:
    """(export folder in the hub layout, its run folder or None) for a RUN_DIR or an export folder."""
    from train.model.hub import CONFIG_FILE, RETIRED_FILES, is_export_dir

    if is_export_dir(path):
        return path, (path.parent if path.name == "export" and (path.parent / "config.yaml").is_file() else None)
    if is_export_dir(path / "export"):
        return path / "export", path
    folder = path / "export" if (path / "export").is_dir() else path
    if (folder / RETIRED_FILES[0]).is_file():
        raise EvalInputError(f"{folder} holds a model.pt export, a layout this version no longer reads: re-export "
                             f"it with `python -m train.export {path}` (writes {CONFIG_FILE} + safetensors)")
    raise EvalInputError(f"{folder}/{CONFIG_FILE} not found: is {path} a finished run? (`python -m train.export "
                         f"{path}` exports its latest checkpoint)")


def load_model(checkpoint: str | Path, model_name: str = "", model_config: str = "",
               device: str = "cpu") -> Tuple[torch.nn.Module, Callable, Callable, Optional[Path]]:
    """(model in eval mode, eval transform, tokenizer, run dir or None) from a RUN_DIR, an export folder in
    open_clip's hub layout (train/model/hub.py) or a bare weights file (with ``model_name`` or
    ``model_config``). A RUN_DIR or export folder loads exactly as ``open_clip.create_model_and_transforms(
    "local-dir:FOLDER")`` loads it, with the preprocessing the run trained with."""
    path = Path(checkpoint)
    if path.is_dir():
        export, run_dir = _export_folder(path)
        import open_clip

        try:
            model, _, eval_transform = open_clip.create_model_and_transforms(f"local-dir:{export}", device=device)
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            raise EvalInputError(f"{export}: not a loadable open_clip export: {' '.join(lines[:2])[:200]}") from None
        model.eval()
        return model, eval_transform, open_clip.get_tokenizer(f"local-dir:{export}"), run_dir
    weights, run_dir = path, None
    if not weights.is_file():
        raise EvalInputError(f"checkpoint {weights} not found (a RUN_DIR with export/, an export folder, or a "
                             "weights file)")
    if model_config:
        try:
            config_json = json.loads(Path(model_config).read_text())
        except (OSError, ValueError) as err:
            raise EvalInputError(f"model_config {model_config}: {err}") from None
        model_name = resolve_model_name(config_json, model_name or f"eval-{Path(model_config).parent.parent.name}")
    if not model_name:
        raise EvalInputError("a bare checkpoint needs model_name=... (or model_config=PATH)")
    import open_clip    # after the path checks: importing it takes seconds

    from train.model.build import CONFIG_DIR, register_model_configs

    register_model_configs()    # the project's own configs/model/*.json by name, as in training (tiny_vit)
    if model_name not in open_clip.list_models():
        raise EvalInputError(f"model_name={model_name} is not an open_clip model, nor one of {CONFIG_DIR} "
                             "(pass model_config=PATH for another architecture)")
    try:
        # pretrained=<file>: open_clip builds and loads in one call (strict; 'module.' prefixes stripped and a
        # [1]-shaped DeepSpeed logit_scale reshaped), so it neither warns "initialized randomly" nor fetches
        # default tower weights that the checkpoint would overwrite.
        model, _, eval_transform = open_clip.create_model_and_transforms(model_name, pretrained=str(weights),
                                                                         device=device)
    except (pickle.UnpicklingError, EOFError) as err:
        raise EvalInputError(f"{weights} is not a PyTorch state-dict file ({type(err).__name__})") from None
    except (RuntimeError, AssertionError, ValueError, KeyError) as err:    # weights of another architecture
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise EvalInputError(f"{weights} does not fit model {model_name}: {' '.join(lines[:2])[:200]}") from None
    model.eval()
    return model, eval_transform, open_clip.get_tokenizer(model_name), run_dir
