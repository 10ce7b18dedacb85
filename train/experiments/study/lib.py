"""The study's data, training loop and evaluation (train/experiments/study/run.py orchestrates them).

Why an in-process loop and not the DeepSpeed trainer: the study trains ~30 tiny models and evaluates
each on 130,000 test images within an hour on 2 cores. It uses the trainer's own pieces (the open_clip
model of train/model/build.py, `ContrastiveObjective` of train/losses/objective.py, `weight_decay_groups`, AdamW, the
cosine schedule) on tensors held in memory, so a run costs its compute and nothing else; the demo
(`make demo`) is the end-to-end path through shards and the DeepSpeed trainer.

Data (Fashion-MNIST, Debian's dataset-fashion-mnist): the 60,000 training images are split once, by a
fixed seed, into pretraining pairs, a val split (tuning and temperature fitting) and a fine-tuning pool
that pretraining never sees; the 10,000 test images are the test split, clean and in the 12 corrupted
copies of train/evaluate/corruptions.py. Captions come from pipeline/demo_source.make_captions.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.demo.source import CLASSNAMES, load_split, make_captions
from train.evaluate import metrics
from train.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from train.evaluate.config import DEFAULT_TEMPLATES
from train.evaluate.core import classification_metrics, embedding_metrics, retrieval_groups
from train.config import LossConfig
from train.losses.objective import ContrastiveObjective
from train.config import ModelConfig
from train.model.build import build_model, weight_decay_groups

# open_clip's OpenAI normalisation (the tiny model's eval transform uses it).
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SHIFTS = [(c, s) for c in sorted(CORRUPTIONS) for s in SEVERITIES]


@dataclass
class Split:
    images: torch.Tensor          # n×32×32 uint8 (28 px resized with bicubic, as the eval transform does)
    labels: torch.Tensor          # n, long
    captions: List[str]


def resize32(img28: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img28, "L").resize((32, 32), Image.BICUBIC))


def _corrupted(images: np.ndarray, keys, choice) -> np.ndarray:
    return np.stack([resize32(np.asarray(corrupt(Image.fromarray(im, "L"), c, s, k)) if c else im)
                     for im, k, (c, s) in zip(images, keys, choice)])


def build_data(cache: Path, sizes: Dict[str, int], seed: int = 0, log=print) -> Dict[str, Split]:
    """{"pretrain", "val", "finetune", "test", "test/<corruption>/<severity>"...} as uint8 tensors.

    The fine-tuning pool is *shifted*: every caption carries attributes (no class-only captions) and
    half of its images are corrupted (a random corruption and severity each, with keys that differ from
    the test keys, so no test noise pattern is seen). Cached in ``cache`` (np.savez) after the first build.
    """
    path = cache / f"study_data_{seed}_{sizes['pretrain']}_{sizes['val']}_{sizes['finetune']}_{sizes['test']}.npz"
    if not path.is_file():
        t0 = time.perf_counter()
        images, labels = load_split("train")
        order = np.random.default_rng([seed, 2024]).permutation(len(labels))
        cuts = np.cumsum([0, sizes["pretrain"], sizes["val"], sizes["finetune"]])
        parts = {name: np.sort(order[cuts[i]:cuts[i + 1]]) for i, name in enumerate(("pretrain", "val", "finetune"))}
        arrays = {}
        for name, idx in parts.items():
            share = 0.0 if name == "finetune" else None
            caps = make_captions(images[idx], labels[idx], seed, *(() if share is None else (share,)))
            if name == "finetune":
                rng = np.random.default_rng([seed, 99])
                choice = [(sorted(CORRUPTIONS)[rng.integers(4)], int(rng.integers(1, 4))) if rng.random() < 0.5
                          else ("", 0) for _ in idx]
                arrays[f"{name}_images"] = _corrupted(images[idx], [f"ft{i}" for i in idx], choice)
            else:
                arrays[f"{name}_images"] = np.stack([resize32(im) for im in images[idx]])
            arrays[f"{name}_labels"], arrays[f"{name}_captions"] = labels[idx], np.array(caps)
        t_images, t_labels = load_split("test")
        t_images, t_labels = t_images[:sizes["test"]], t_labels[:sizes["test"]]
        arrays["test_images"] = np.stack([resize32(im) for im in t_images])
        arrays["test_labels"], arrays["test_captions"] = t_labels, np.array(make_captions(t_images, t_labels, seed + 1))
        keys = [f"{i:014d}" for i in range(len(t_labels))]
        for c, s in SHIFTS:
            arrays[f"test/{c}/{s}_images"] = _corrupted(t_images, keys, [(c, s)] * len(keys))
            arrays[f"test/{c}/{s}_labels"] = t_labels
            arrays[f"test/{c}/{s}_captions"] = arrays["test_captions"]
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        log(f"data built in {time.perf_counter() - t0:.0f} s: {path}")
    z = np.load(path)
    names = sorted({k.rsplit("_", 1)[0] for k in z.files})
    return {n: Split(torch.from_numpy(z[f"{n}_images"]), torch.from_numpy(z[f"{n}_labels"].astype(np.int64)),
                     [str(c) for c in z[f"{n}_captions"]]) for n in names}


def to_input(images_u8: torch.Tensor, device) -> torch.Tensor:
    x = images_u8.to(device, non_blocking=True).float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - MEAN.to(device)) / STD.to(device)


class Tokens:
    """Captions tokenised once per distinct string (there are far fewer strings than images)."""

    def __init__(self, tokenizer, captions: List[str]):
        distinct = list(dict.fromkeys(captions))
        index = {c: i for i, c in enumerate(distinct)}
        self.table = torch.cat([tokenizer(distinct[i:i + 4096]) for i in range(0, len(distinct), 4096)])
        self.rows = torch.tensor([index[c] for c in captions])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[self.rows[idx]]


@dataclass
class RunSpec:
    """One training run: what the study varies per arm."""
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    loss: LossConfig
    seed: int
    init_state: Optional[dict] = None    # fine-tuning starts from these weights


def new_model(device):
    model, _, _, tokenizer = build_model(ModelConfig(name="tiny_vit"), device)
    return model, tokenizer


def train_run(spec: RunSpec, split: Split, tokens: Tokens, device, log=print) -> tuple:
    """Train one model in this process; returns (model, per-step records of the loss terms every 25 steps)."""
    torch.manual_seed(spec.seed)
    model, _ = new_model(device)
    if spec.init_state is not None:
        model.load_state_dict(spec.init_state)
    if spec.loss.clip_logit_scale is not None:
        # Store the fixed scale in the model, so evaluation uses the scale it was fine-tuned with
        # (the reference evaluates with the same fixed τ it trains with).
        with torch.no_grad():
            model.logit_scale.fill_(math.log(spec.loss.clip_logit_scale))
    model.train()
    opt = torch.optim.AdamW(weight_decay_groups(model, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.98), eps=1e-6)
    objective = ContrastiveObjective(spec.loss, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    n, order, pos, records = len(split.labels), torch.randperm(len(split.labels), generator=gen), 0, []
    for step in range(spec.steps):
        if pos + spec.batch > n:    # a new epoch: a fresh permutation (drop the incomplete tail)
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + spec.batch]
        pos += spec.batch
        lr = spec.lr * (step + 1) / spec.warmup if step < spec.warmup else \
            0.5 * spec.lr * (1 + math.cos(math.pi * (step - spec.warmup) / max(1, spec.steps - spec.warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        image = F.normalize(model.encode_image(to_input(split.images[idx], device)), dim=-1)
        text = F.normalize(model.encode_text(tokens[idx].to(device)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0).reshape(())
        draws = objective.draw_lambda() if spec.loss.mixes else None
        out = objective(image, text, scale, lam=draws)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step} ({spec})")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == spec.steps - 1:
            records.append({"step": step, "logit_scale": scale.item(), **{k: v.item() for k, v in out.items()}})
            if step % 100 == 0:
                log(f"  step {step}/{spec.steps}: loss {records[-1]['loss']:.4f}, scale {records[-1]['logit_scale']:.1f}")
    model.eval()
    return model, records


@torch.no_grad()
def encode_images(model, images_u8: torch.Tensor, device, batch: int = 2000) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(to_input(images_u8[i:i + batch], device)).float(), dim=-1).cpu()
                      for i in range(0, len(images_u8), batch)])


@torch.no_grad()
def encode_texts(model, tokenizer, texts: List[str], device, batch: int = 2000) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch]).to(device)).float(), dim=-1).cpu()
                      for i in range(0, len(texts), batch)])


@torch.no_grad()
def class_weights(model, tokenizer, device) -> torch.Tensor:
    prompts = [t.format(c) for c in CLASSNAMES for t in DEFAULT_TEMPLATES]
    feats = encode_texts(model, tokenizer, prompts, device).view(len(CLASSNAMES), len(DEFAULT_TEMPLATES), -1)
    return F.normalize(feats.mean(1), dim=-1)


def val_top1(model, tokenizer, data: Dict[str, Split], device) -> float:
    w = class_weights(model, tokenizer, device)
    feats = encode_images(model, data["val"].images, device)
    return (feats @ w.T).argmax(1).eq(data["val"].labels).double().mean().item()


def evaluate_model(model, tokenizer, data: Dict[str, Split], device, reference_size: int, shifted: bool = True) -> Dict:
    """The papers' metrics on the test split (clean, and each corrupted copy when ``shifted``).

    k-NN consistency votes over ``reference_size`` pretraining-split image embeddings; the temperature
    of ECE/NLL after scaling is fitted on the val split.
    """
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0].clamp(max=100))
    w = class_weights(model, tokenizer, device)
    pre = data["pretrain"]
    reference = (encode_images(model, pre.images[:reference_size], device), pre.labels[:reference_size])
    val_feats = encode_images(model, data["val"].images, device)
    temperature = metrics.fit_temperature(scale * val_feats @ w.T, data["val"].labels)
    test = data["test"]
    feats = encode_images(model, test.images, device)
    out = {"logit_scale": scale, "clean": classification_metrics(feats, w, test.labels, scale, 15, reference, temperature)}
    distinct = list(dict.fromkeys(test.captions))
    text_feats = encode_texts(model, tokenizer, distinct, device)
    index = {c: i for i, c in enumerate(distinct)}
    paired = text_feats[[index[c] for c in test.captions]]
    out["embedding"] = embedding_metrics(feats, paired)
    texts, img_group, txt_group = retrieval_groups(test.captions, test.labels.tolist(), "caption")
    out["retrieval"] = metrics.retrieval_recalls(feats, text_feats[[index[c] for c in texts]], img_group, txt_group)
    label_groups = retrieval_groups(test.captions, test.labels.tolist(), "label")
    out["retrieval_label"] = metrics.retrieval_recalls(feats, paired, label_groups[1], label_groups[2], (1,))
    out["shift"] = {}
    if shifted:
        for c, s in SHIFTS:
            sh = data[f"test/{c}/{s}"]
            m = classification_metrics(encode_images(model, sh.images, device), w, sh.labels, scale, 15,
                                       reference, temperature)
            m.pop("calibration")
            out["shift"][f"{c}/{s}"] = m
        out["shifted_top1"] = float(np.mean([m["top1"] for m in out["shift"].values()]))
        out["shifted_ece"] = float(np.mean([m["ece"] for m in out["shift"].values()]))
    return out


@torch.no_grad()
def within_class_text_cosine(model, tokenizer, captions: List[str], labels: torch.Tensor, device,
                             per_class: int = 200) -> float:
    """Mean cosine between the text embeddings of two different captions' rows of the same class."""
    values = []
    for c in range(len(CLASSNAMES)):
        rows = torch.nonzero(labels == c).flatten()[:per_class].tolist()
        f = encode_texts(model, tokenizer, [captions[i] for i in rows], device)
        sim = f @ f.T
        values.append(float((sim.sum() - sim.diag().sum()) / (len(rows) * (len(rows) - 1))))
    return float(np.mean(values))


def save_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
