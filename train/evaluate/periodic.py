"""Light evaluations the trainer runs while it trains: a small held-out split of its own data
(``evaluate_model``), and zero-shot classification on standard sets (``zero_shot``, logging.zeroshot).

One clean pass, no corruptions, no files: each returns flat scalars the trainer logs to metrics.jsonl,
TensorBoard and wandb (prefixed, e.g. ``eval/zero_shot_top1``, ``zeroshot/imagenet/top1``). Works on any model with ``encode_image`` and
``encode_text`` (a DeepSpeed engine is unwrapped to its module); the model's train/eval mode is restored.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from common.shard_folder import read_manifest

from . import metrics
from .config import DEFAULT_TEMPLATES
from .core import retrieval_groups, templates_for
from .data import _device_of, encode_images, encode_texts, iter_samples, logit_scale_of, zero_shot_weights
from .datasets import EvalSet


def evaluate_model(model, tokenizer: Callable, eval_transform: Callable, dataset_folder: str, split: str = "val",
                   max_samples: int = 512, classnames: Optional[Sequence[str]] = None,
                   templates: Optional[Sequence[str]] = None, batch_size: int = 128) -> Dict[str, float]:
    """Zero-shot top-1/top-5 (labelled sets), retrieval R@1/R@5 both ways (captioned sets; identical
    captions merged), alignment and modality gap on the first ``max_samples`` samples of ``split``."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return _evaluate(_CastInputs(module), tokenizer, eval_transform, dataset_folder, split, max_samples,
                             classnames, templates or DEFAULT_TEMPLATES, batch_size)
    finally:
        module.train(was_training)


class EvalReadError(RuntimeError):
    """A zero-shot set could not be read on some rank; every rank skipped the evaluation."""


def zero_shot(model, tokenizer: Callable, eval_transform: Callable, eval_set: EvalSet, max_samples: int = 1000,
              templates: Sequence[str] = (), batch_size: int = 128,
              any_rank: Callable[[bool], bool] = lambda flag: flag) -> Dict[str, float]:
    """Zero-shot top-1, top-5 and mean per-class recall on the first ``max_samples`` samples of a classification
    set (either format), with its own class names and templates unless ``templates`` is given. The metrics are
    the evaluator's (and CLIP_benchmark's) on the same samples.

    Every rank reads the same samples. ``any_rank(flag)`` (a collective: True on every rank if it is True on
    one) is asked before each batch whether some rank failed to read it, so that all ranks run the same
    forwards (ZeRO-3 gathers parameters in them) and a shard that fails on one rank makes every rank stop the
    evaluation together (EvalReadError), not hang in a collective the failed rank never joins.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            cast = _CastInputs(module)
            feats, labels = [], []
            batches = _batches(eval_set.samples(max_samples), eval_transform, batch_size,
                               len(eval_set.classnames or []))
            while True:
                try:
                    batch, error = next(batches, None), None
                except Exception as err:    # noqa: BLE001 - any read failure is agreed on, then raised below
                    batch, error = None, err
                if any_rank(error is not None):
                    raise EvalReadError(f"{eval_set.location}: {error or 'a shard failed on another rank'}")
                if batch is None:
                    break
                images, batch_labels = batch
                feats.append(torch.nn.functional.normalize(cast.encode_image(images.to(_device_of(module))), dim=-1)
                             .float().cpu())
                labels += batch_labels
            if not feats or not eval_set.classnames or any(lab is None for lab in labels):
                raise ValueError(f"{eval_set.location}: not a classification set (class names and a label per sample)")
            weights = zero_shot_weights(cast, tokenizer, eval_set.classnames,
                                        templates_for(templates, eval_set), batch_size)
    finally:
        module.train(was_training)
    logits = torch.cat(feats) @ weights.T
    target = torch.tensor(labels)
    acc = metrics.topk_accuracy(logits, target, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "mean_per_class_recall": metrics.mean_per_class_recall(
        logits.argmax(dim=1), target), "num_samples": float(len(target))}


def _batches(samples, transform: Callable, batch_size: int, num_classes: int):
    """(images (B, 3, H, W), labels) batches of eval-transformed samples; a sample without a label in
    0..num_classes-1 is a read error (agreed on and skipped like a damaged shard)."""
    images, labels = [], []
    for s in samples:
        if s.label is None or not 0 <= s.label < num_classes:
            raise ValueError(f"sample {s.key}: label {s.label} is not one of the {num_classes} classes")
        images.append(transform(s.image.convert("RGB")))
        labels.append(s.label)
        if len(images) == batch_size:
            yield torch.stack(images), labels
            images, labels = [], []
    if images:
        yield torch.stack(images), labels


class _CastInputs:
    """The model as the evaluation helpers see it: images cast to the weights' dtype (bf16 weights under
    zero.precision=bf16, zero.bf16_mode=weights; the helpers move them to the weights' device), features
    and logit scale returned in fp32, so the metrics are computed in fp32 on any engine."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def parameters(self):
        return self.module.parameters()

    def encode_image(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.module.encode_image(images.to(self.dtype), **kwargs).float()

    def encode_text(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.module.encode_text(tokens, **kwargs).float()

    @property
    def logit_scale(self):
        scale = getattr(self.module, "logit_scale", None)
        return None if scale is None else scale.detach().float()


def _evaluate(model, tokenizer, eval_transform, folder, split, max_samples, classnames, templates, batch_size):
    keys_labels_captions = []

    def recorded():
        for s in iter_samples(folder, split, max_samples):
            keys_labels_captions.append((s.label, s.caption))
            yield s

    image_features = encode_images(model, eval_transform, recorded(), batch_size)
    labels = [lab for lab, _ in keys_labels_captions]
    captions = [cap for _, cap in keys_labels_captions]
    out: Dict[str, float] = {"num_samples": float(len(image_features))}
    classnames = list(classnames or read_manifest(folder).classnames() or [])
    if classnames and all(lab is not None for lab in labels):
        weights = zero_shot_weights(model, tokenizer, classnames, templates, batch_size)
        logits = logit_scale_of(model) * image_features @ weights.T
        acc = metrics.topk_accuracy(logits, torch.tensor(labels), (1, 5))
        out["zero_shot_top1"], out["zero_shot_top5"] = acc[1], acc[5]
    if all(c is not None for c in captions):
        texts, image_group, text_group = retrieval_groups(captions, None, "caption")
        text_features = encode_texts(model, tokenizer, texts, batch_size)
        recalls = metrics.retrieval_recalls(image_features, text_features, image_group, text_group, (1, 5))
        out.update({k.replace("@", "_at_"): v for k, v in recalls.items()})
        paired = text_features[image_group]
        out["alignment"] = metrics.alignment(image_features, paired)
        out["modality_gap"] = metrics.modality_gap(image_features, paired)
    return out
