"""The evaluation suite: one model, one dataset split → one nested dict of results (eval.json)."""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import metrics
from .config import DEFAULT_TEMPLATES, EvalConfig, EvalInputError
from .data import EmptySplitError, Sample, encode_images, encode_texts, iter_samples, logit_scale_of, zero_shot_weights
from .datasets import EvalSet, open_eval_set

RELEVANCE_TEXT = {
    "caption": "an image and a text match iff the text is the image's own caption string; identical caption "
               "strings are merged into one gallery text (with class-level captions: any image of the class "
               "is relevant to its caption)",
    "instance": "only the image's own caption (row i ↔ text i) is relevant; duplicate captions are kept as "
                "separate gallery texts",
    "label": "a text is relevant to every image of the same class label as the text's own image",
    "clip_benchmark": "each image has several captions (a CLIP_benchmark retrieval set); a text is relevant only "
                      "to its own image. i2t R@k: an image counts if any of its captions is among its k nearest "
                      "texts; t2i R@k: averaged over all texts; ties (identical captions) fall in torch.topk's "
                      "order (CLIP_benchmark's zeroshot_retrieval)",
}


class _Recorder:
    """Passes samples through while keeping their keys, labels and captions (one read of the shards)."""

    def __init__(self, samples: Iterator[Sample]):
        self.samples, self.keys, self.labels, self.captions, self.all_captions = samples, [], [], [], []

    def __iter__(self):
        for s in self.samples:
            self.keys.append(s.key), self.labels.append(s.label), self.captions.append(s.caption)
            self.all_captions.append(s.captions)
            yield s


def classification_metrics(image_features: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor,
                           logit_scale: float, ece_bins: int, reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                           temperature: Optional[float] = None,
                           ks: Sequence[int] = metrics.CONSISTENCY_KS) -> Dict[str, object]:
    """Zero-shot top-1/top-5, mean per-class recall, ECE + NLL (+ after temperature scaling) + reliability bins, and consistency.

    ``reference`` = (training image embeddings, their labels) gives CyCLIP's consistency (k-NN vote over
    them, each k in ``ks``; ``consistency`` is the mean over k). Without it, consistency compares with the
    nearest leave-one-out class prototype of ``image_features`` (not the paper's definition; marked so).
    ``temperature`` (fitted on val with metrics.fit_temperature) adds ``ece_ts`` and ``nll_ts``.
    """
    logits = logit_scale * image_features @ class_weights.T
    probs = logits.softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    correct = pred == labels
    acc = metrics.topk_accuracy(logits, labels, (1, 5))
    out = {"top1": acc[1], "top5": acc[5], "mean_per_class_recall": metrics.mean_per_class_recall(pred, labels),
           **metrics.calibration_metrics(logits, labels, 1.0, ece_bins)}
    if temperature is not None:
        scaled = metrics.calibration_metrics(logits, labels, temperature, ece_bins)
        out.update(temperature=temperature, ece_ts=scaled["ece"], nll_ts=scaled["nll"])
    if reference is not None:
        knn = metrics.knn_predictions(image_features, reference[0], reference[1], ks)
        per_k = {str(k): metrics.consistency(pred, p) for k, p in knn.items()}
        out.update(consistency=sum(per_k.values()) / len(per_k), consistency_k=per_k,
                   consistency_definition="knn_train",
                   knn_top1_k={str(k): (p == labels).double().mean().item() for k, p in knn.items()})
        out["in_modal_top1"] = out["knn_top1_k"][str(max(ks))] if 10 not in ks else out["knn_top1_k"]["10"]
    else:
        in_modal = metrics.in_modal_predictions(image_features, labels, class_weights.shape[0])
        out.update(consistency=metrics.consistency(pred, in_modal), consistency_definition="loo_prototype",
                   in_modal_top1=(in_modal == labels).double().mean().item())
    out["calibration"] = metrics.calibration_bins(confidence, correct, ece_bins)
    return out


def reference_inputs(model, eval_transform, tokenizer, cfg: EvalConfig, class_weights, scale, progress):
    """(k-NN reference (features, labels) or None, fitted temperature or None) from cfg.reference_dataset."""
    if not cfg.reference_dataset:
        return None, None
    rec = _Recorder(iter_samples(cfg.reference_dataset, cfg.reference_split, cfg.reference_max_samples))
    ref_feats = encode_images(model, eval_transform, iter(rec), cfg.batch_size)
    if any(lab is None for lab in rec.labels):
        raise ValueError(f"{cfg.reference_dataset}:{cfg.reference_split} lacks labels: no k-NN consistency")
    reference = (ref_feats, torch.tensor(rec.labels))
    val = _Recorder(iter_samples(cfg.reference_dataset, cfg.calibration_split))
    val_feats = encode_images(model, eval_transform, iter(val), cfg.batch_size)
    temperature = None
    if len(val_feats) and all(lab is not None for lab in val.labels):
        temperature = metrics.fit_temperature(scale * val_feats @ class_weights.T, torch.tensor(val.labels))
    progress(f"reference: {len(ref_feats)} {cfg.reference_split} images, temperature {temperature} "
             f"fitted on {len(val_feats)} {cfg.calibration_split} images")
    return reference, temperature


def embedding_metrics(image_features: torch.Tensor, paired_text: torch.Tensor) -> Dict[str, float]:
    """Alignment, uniformity (per modality and union), modality gap, C_in and C_cross over the pairs."""
    out = {"alignment": metrics.alignment(image_features, paired_text),
           "uniformity_image": metrics.uniformity(image_features),
           "uniformity_text": metrics.uniformity(paired_text),
           "uniformity_union": metrics.uniformity(torch.cat([image_features, paired_text])),
           "modality_gap": metrics.modality_gap(image_features, paired_text)}
    out.update(metrics.cyclip_regularizers(image_features, paired_text))
    return out


def retrieval_groups(captions: Sequence[str], labels: Optional[Sequence[int]], relevance: str):
    """(gallery texts, image group ids, text group ids) for a relevance definition (see RELEVANCE_TEXT)."""
    n = len(captions)
    if relevance == "instance":
        return list(captions), torch.arange(n), torch.arange(n)
    if relevance == "label":
        if labels is None or any(lab is None for lab in labels):
            raise ValueError("retrieval_relevance=label needs a label on every sample")
        lab = torch.tensor(list(labels))
        return list(captions), lab, lab
    unique = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([index[c] for c in captions]), torch.arange(len(unique))


def templates_for(cfg_templates: Sequence[str], eval_set: EvalSet) -> List[str]:
    """The prompt templates: the user's, else the dataset's own, else DEFAULT_TEMPLATES."""
    return list(cfg_templates) or list(eval_set.templates or []) or list(DEFAULT_TEMPLATES)


def evaluate(model, eval_transform: Callable, tokenizer: Callable, cfg: EvalConfig,
             progress: Callable[[str], None] = lambda msg: None) -> Dict[str, object]:
    """All metrics of docs/METHODS.md §4 on ``cfg.dataset``/``cfg.split`` (either format,
    train/evaluate/datasets.py), clean and under corruptions."""
    t0 = time.perf_counter()
    model.eval()
    scale = cfg.logit_scale or logit_scale_of(model)
    eval_set = open_eval_set(cfg.dataset, cfg.split, storage_options=cfg.storage_options or None)
    recorder = _Recorder(eval_set.samples(cfg.max_samples))
    try:
        image_features = encode_images(model, eval_transform, iter(recorder), cfg.batch_size)
    except EmptySplitError:
        raise EvalInputError(f"dataset={cfg.dataset}: split '{cfg.split}' has no samples") from None
    n = len(image_features)
    progress(f"encoded {n} clean images")
    classnames = list(cfg.classnames) or eval_set.classnames
    templates = templates_for(cfg.templates, eval_set)
    has_labels = all(lab is not None for lab in recorder.labels)
    has_captions = all(c is not None for c in recorder.captions)
    if eval_set.task == "classification" and not classnames:
        raise EvalInputError(f"dataset={cfg.dataset}: a classification set needs class names (classnames.txt "
                             "beside it, or classnames=[...])")
    results: Dict[str, object] = {
        "dataset": {"folder": str(cfg.dataset), "split": cfg.split, "format": eval_set.format, "num_samples": n,
                    "num_classes": len(classnames) if classnames else 0},
        "model": {"logit_scale": scale}}

    class_weights = labels = None
    if has_labels and classnames:
        labels = torch.tensor(recorder.labels)
        bad = labels[(labels < 0) | (labels >= len(classnames))]
        if len(bad):
            raise EvalInputError(f"dataset={cfg.dataset}: label {int(bad[0])} outside 0..{len(classnames) - 1} "
                                 f"({len(classnames)} class names; {len(bad)} such samples)")
        class_weights = zero_shot_weights(model, tokenizer, classnames, templates, cfg.batch_size)
        reference, temperature = reference_inputs(model, eval_transform, tokenizer, cfg, class_weights, scale, progress)
        clean = classification_metrics(image_features, class_weights, labels, scale, cfg.ece_bins, reference,
                                       temperature, cfg.consistency_ks)
        results["calibration"] = clean.pop("calibration")
        results["zero_shot"] = {**clean, "num_templates": len(templates), "chance_top1": 1 / len(classnames)}

    # Pairs for alignment/uniformity/gap/C_in/C_cross: each image with its caption, or, for a pure
    # classification set, with its class's prompt-ensemble embedding.
    paired_text = None
    if has_captions and eval_set.format == "clip_benchmark":
        results["retrieval"], paired_text = benchmark_retrieval(model, tokenizer, image_features, recorder.all_captions,
                                                                cfg.batch_size)
    elif has_captions:
        unique = list(dict.fromkeys(recorder.captions))
        unique_feats = encode_texts(model, tokenizer, unique, cfg.batch_size)
        index = {c: i for i, c in enumerate(unique)}
        paired_text = unique_feats[[index[c] for c in recorder.captions]]
        texts, img_group, txt_group = retrieval_groups(recorder.captions, recorder.labels if has_labels else None,
                                                       cfg.retrieval_relevance)
        gallery = unique_feats[[index[c] for c in texts]]
        results["retrieval"] = {"relevance": cfg.retrieval_relevance,
                                "relevance_definition": RELEVANCE_TEXT[cfg.retrieval_relevance],
                                "num_images": n, "num_texts": len(texts),
                                **metrics.retrieval_recalls(image_features, gallery, img_group, txt_group)}
    elif class_weights is not None:
        paired_text = class_weights[labels]
    if paired_text is not None:
        results["embedding"] = {"pairs": "caption" if has_captions else "class_prompt_ensemble",
                                **embedding_metrics(image_features, paired_text)}
    progress("clean metrics done")

    if class_weights is not None and cfg.corruptions:
        results["shift"] = shift_metrics(model, eval_transform, cfg, class_weights, labels, scale, progress,
                                         reference, temperature)
        results["robustness"] = robustness_summary(results["zero_shot"]["top1"], results["shift"])
    results["seconds"] = time.perf_counter() - t0
    return results


def benchmark_retrieval(model, tokenizer, image_features: torch.Tensor, captions: Sequence[Sequence[str]],
                        batch_size: int):
    """Recall@k both ways over every caption of every image, as CLIP_benchmark scores retrieval; and each
    image's pair for the embedding metrics (its first caption)."""
    texts = [c for caps in captions for c in caps]
    text_group = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_features = encode_texts(model, tokenizer, texts, batch_size)
    first = torch.tensor([0] + [len(caps) for caps in captions[:-1]]).cumsum(0)
    out = {"relevance": "clip_benchmark", "relevance_definition": RELEVANCE_TEXT["clip_benchmark"],
           "num_images": len(image_features), "num_texts": len(texts),
           **metrics.benchmark_recalls(image_features, text_features, text_group)}
    return out, text_features[first]


def shift_metrics(model, eval_transform, cfg: EvalConfig, class_weights, labels, scale, progress,
                  reference=None, temperature=None) -> Dict:
    """Zero-shot metrics on every corrupted copy of the split: {corruption: {severity: {...}}}."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for corruption in cfg.corruptions:
        out[corruption] = {}
        for severity in cfg.severities:
            samples = open_eval_set(cfg.dataset, cfg.split, storage_options=cfg.storage_options or None).samples(
                cfg.max_samples)
            feats = encode_images(model, eval_transform, samples, cfg.batch_size, corruption, severity)
            m = classification_metrics(feats, class_weights, labels, scale, cfg.ece_bins, reference, temperature,
                                       cfg.consistency_ks)
            m.pop("calibration")
            out[corruption][str(severity)] = m
            progress(f"{corruption} severity {severity}: top1 {m['top1']:.3f}")
    return out


def robustness_summary(clean_top1: float, shift: Dict) -> Dict[str, float]:
    """Shifted against clean top-1: mean shifted accuracy, its drop, and the fraction of accuracy kept.

    Effective robustness proper needs a baseline trend over several models; ``compare`` computes it.
    """
    accs: List[float] = [m["top1"] for sev in shift.values() for m in sev.values()]
    mean_shift = sum(accs) / len(accs)
    out = {"clean_top1": clean_top1, "shifted_top1": mean_shift, "drop": clean_top1 - mean_shift,
           "relative": mean_shift / clean_top1 if clean_top1 > 0 else 0.0}
    for corruption, sev in shift.items():
        out[f"{corruption}_top1"] = sum(m["top1"] for m in sev.values()) / len(sev)
    return out


def headline(results: Dict) -> Dict[str, float]:
    """The flat scalars compared across runs (metric bars, compare table)."""
    flat: Dict[str, float] = {}
    for section, keys in (("zero_shot", ("top1", "top5", "mean_per_class_recall", "ece", "nll", "ece_ts", "nll_ts", "consistency")),
                          ("retrieval", ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")),
                          ("embedding", ("alignment", "uniformity_union", "modality_gap", "C_in", "C_cross")),
                          ("robustness", ("shifted_top1", "relative"))):
        for k in keys:
            if k in results.get(section, {}):
                flat[f"{section}.{k}"] = float(results[section][k])
    return flat
