"""The study's evaluation: train/evaluate's own encoders, zero-shot classifier and metrics on in-memory splits.

The result has the evaluator's keys (eval.json of `python -m train.evaluate`, docs/METHODS.md §4.1):
"dataset", "model", "zero_shot", "calibration", "retrieval", "embedding", "shift" ({corruption: {severity:
...}}) and "robustness", plus two the evaluator has no setting for: "retrieval_label" (label relevance) and
"robustness.shifted_ece". Images go through ``encode_images`` with the model's eval transform
(``lib.Preprocess``); the corrupted copies were made once by the evaluator's ``corrupt`` with the keys
below, so they equal what ``encode_images(..., corruption, severity)`` would make of the 28 px originals.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from pipeline.demo.source import CLASSNAMES
from train.evaluate import metrics
from train.evaluate.config import DEFAULT_TEMPLATES, EvalConfig
from train.evaluate.core import (RELEVANCE_TEXT, classification_metrics, embedding_metrics, retrieval_groups,
                                 robustness_summary)
from train.evaluate.data import Sample, encode_images, encode_texts, logit_scale_of, zero_shot_weights

from .lib import SHIFTS, Preprocess, Split

EVAL = EvalConfig()    # the evaluator's defaults: ECE bins, k of the k-NN consistency
TEMPLATES = EVAL.templates or DEFAULT_TEMPLATES    # what the evaluator uses on a dataset without its own
BATCH = 2000


def samples(split: Split, count: Optional[int] = None) -> Iterator[Sample]:
    """The first ``count`` (default all) rows of ``split`` as the evaluator's samples (key = row index)."""
    from PIL import Image

    for i in range(len(split.labels) if count is None else min(count, len(split.labels))):
        yield Sample(f"{i:014d}", Image.fromarray(split.images[i].numpy(), "L"), int(split.labels[i]),
                     split.captions[i])


def encode(model, preprocess: Preprocess, split: Split, count: Optional[int] = None) -> torch.Tensor:
    """n×d L2-normalised image embeddings (float32, CPU) of the first ``count`` rows."""
    return encode_images(model, preprocess, samples(split, count), BATCH)


def class_weights(model, tokenizer) -> torch.Tensor:
    """10×d zero-shot classifier: the evaluator's prompt ensemble over the Fashion-MNIST class names."""
    return zero_shot_weights(model, tokenizer, CLASSNAMES, TEMPLATES, BATCH)


def val_top1(model, tokenizer, preprocess: Preprocess, data: Dict[str, Split]) -> float:
    """Zero-shot top-1 on the val split (the tuning score)."""
    val = data["val"]
    feats = encode(model, preprocess, val)
    return classification_metrics(feats, class_weights(model, tokenizer), val.labels, logit_scale_of(model),
                                  EVAL.ece_bins, ks=EVAL.consistency_ks)["top1"]


def caption_metrics(model, tokenizer, feats: torch.Tensor, test: Split) -> Dict:
    """"embedding" over (image, own caption) pairs; "retrieval" (identical captions merged) and
    "retrieval_label" (any caption of the same class is relevant), as the evaluator writes them."""
    distinct = list(dict.fromkeys(test.captions))
    text_feats = encode_texts(model, tokenizer, distinct, BATCH)
    index = {c: i for i, c in enumerate(distinct)}
    paired = text_feats[[index[c] for c in test.captions]]
    out = {"embedding": {"pairs": "caption", **embedding_metrics(feats, paired)}}
    for key, relevance, ks in (("retrieval", "caption", (1, 5, 10)), ("retrieval_label", "label", (1,))):
        texts, image_group, text_group = retrieval_groups(test.captions, test.labels.tolist(), relevance)
        gallery = text_feats[[index[c] for c in texts]]
        out[key] = {"relevance": relevance, "relevance_definition": RELEVANCE_TEXT[relevance],
                    "num_images": len(feats), "num_texts": len(texts),
                    **metrics.retrieval_recalls(feats, gallery, image_group, text_group, ks)}
    return out


def evaluate_model(model, tokenizer, preprocess: Preprocess, data: Dict[str, Split], reference_size: int,
                   shifted: bool = True) -> Dict:
    """The papers' metrics on the test split (clean, and each corrupted copy when ``shifted``).

    k-NN consistency votes over the first ``reference_size`` pretraining-split image embeddings (the
    evaluator's ``reference_dataset``); the temperature of ECE/NLL after scaling is fitted on the val split
    (its ``calibration_split``). The zero-shot scale is the model's exp(logit_scale).
    """
    model.eval()
    scale = logit_scale_of(model)
    weights = class_weights(model, tokenizer)
    pre, val, test = data["pretrain"], data["val"], data["test"]
    reference = (encode(model, preprocess, pre, reference_size), pre.labels[:reference_size])
    temperature = metrics.fit_temperature(scale * encode(model, preprocess, val) @ weights.T, val.labels)

    def scores(split: Split) -> Dict:
        return classification_metrics(encode(model, preprocess, split), weights, split.labels, scale, EVAL.ece_bins,
                                      reference, temperature, EVAL.consistency_ks)

    feats = encode(model, preprocess, test)
    clean = classification_metrics(feats, weights, test.labels, scale, EVAL.ece_bins, reference, temperature,
                                   EVAL.consistency_ks)
    out = {"dataset": {"folder": "study (in memory)", "split": "test", "num_samples": len(feats),
                       "num_classes": len(CLASSNAMES)},
           "model": {"logit_scale": scale}, "calibration": clean.pop("calibration"),
           "zero_shot": {**clean, "num_templates": len(TEMPLATES), "chance_top1": 1 / len(CLASSNAMES)},
           **caption_metrics(model, tokenizer, feats, test)}
    if shifted:
        shift: Dict[str, Dict[str, Dict]] = {}
        for corruption, severity in SHIFTS:
            m = scores(data[f"test/{corruption}/{severity}"])
            m.pop("calibration")
            shift.setdefault(corruption, {})[str(severity)] = m
        out["shift"] = shift
        out["robustness"] = {**robustness_summary(out["zero_shot"]["top1"], shift),
                             "shifted_ece": float(np.mean([m["ece"] for sev in shift.values() for m in sev.values()]))}
    return out


@torch.no_grad()
def within_class_text_cosine(model, tokenizer, captions: List[str], labels: torch.Tensor, per_class: int = 200) -> float:
    """Mean cosine between the text embeddings of two different captions' rows of the same class."""
    values = []
    for c in range(len(CLASSNAMES)):
        rows = torch.nonzero(labels == c).flatten()[:per_class].tolist()
        f = encode_texts(model, tokenizer, [captions[i] for i in rows], BATCH)
        sim = f @ f.T
        values.append(float((sim.sum() - sim.diag().sum()) / (len(rows) * (len(rows) - 1))))
    return float(np.mean(values))
