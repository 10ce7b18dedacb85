"""The study's data and its training runs (train/experiments/study/run.py orchestrates them).

Why in-process and not the DeepSpeed trainer: the study trains ~30 tiny models and evaluates each on
130,000 test images within an hour on 2 cores. Each run is ``train.core.inprocess.train_in_process``: the
trainer's own step (``ContrastiveStep`` with ``ContrastiveObjective``), schedule (``cosine_lr``) and optimizer
(``build_optimizer``, ``plain_optimizer_step``) configured by the trainer's schemas, on tensors held in
memory, so a run costs its compute and nothing else; the model is train/model/build.py's, saved with the
trainer's ``export_state_dict`` and loaded the way a fine-tuning run loads ``model.pretrained``. The demo
(`make demo`) is the end-to-end path through shards and the DeepSpeed trainer.

Data (Fashion-MNIST, Debian's dataset-fashion-mnist): the 60,000 training images are split once, by a
fixed seed, into pretraining pairs, a val split (tuning and temperature fitting) and a fine-tuning pool
that pretraining never sees; the 10,000 test images are the test split, clean and in the 12 corrupted
copies of train/evaluate/corruptions.py. Captions come from pipeline/demo/source.make_captions.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from pipeline.demo.source import load_split, make_captions
from train.config import LossConfig, ModelConfig, OptimConfig
from train.core.inprocess import epoch_batches, train_in_process
from train.experiments.study.config import RECORD_EVERY
from train.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from train.model.build import build_model, export_state_dict

SHIFTS = [(c, s) for c in sorted(CORRUPTIONS) for s in SEVERITIES]
MODEL = "tiny_vit"
RUN_FORMAT = 3
"""Version of a run's saved files (runs/<name>/run.json, model.pt, eval.json). 2: trained through the
trainer's core, model.pt an exported state dict, eval.json with the evaluator's keys; 3: the records carry
the training probe (Probe). A saved run of another version is retrained (version 1, the study's own loop
with test.json, is not reused)."""


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


class Tokens:
    """Captions tokenised once per distinct string (there are far fewer strings than images)."""

    def __init__(self, tokenizer, captions: List[str]):
        distinct = list(dict.fromkeys(captions))
        index = {c: i for i, c in enumerate(distinct)}
        self.table = torch.cat([tokenizer(distinct[i:i + 4096]) for i in range(0, len(distinct), 4096)])
        self.rows = torch.tensor([index[c] for c in captions])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[self.rows[idx]]


class Preprocess:
    """The model's eval transform, computed directly for images already at its input size.

    For an image of the model's size (the study stores 32 px, resized like the transform would) the
    transform's Resize and CenterCrop are identities, leaving ToTensor and Normalize with the model's own
    mean and std (open_clip's preprocess config, not typed here). Doing those two on tensors costs a tenth
    of the PIL pipeline; tests/train/experiments/test_study_core.py checks that both give the same tensors. Other sizes go through the
    transform itself.
    """

    def __init__(self, model, eval_transform: Callable):
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        self.size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self._mean_np, self._std_np = self.mean[0].numpy(), self.std[0].numpy()
        self.eval_transform = eval_transform

    def batch(self, images_u8: torch.Tensor, device) -> torch.Tensor:
        """n×H×W grey uint8 → n×3×H×W normalised float on ``device`` (training batches)."""
        x = images_u8.to(device, non_blocking=True).float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self.mean.to(device)) / self.std.to(device)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image → 3×H×W, as the eval transform (the per-sample transform of evaluation)."""
        if image.size != self.size[::-1] or image.mode != "RGB":
            return self.eval_transform(image)
        # numpy, not torch: per-op overhead dominates at 32 px (60 µs vs 120 µs); the same float32 IEEE ops.
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        return torch.from_numpy((x - self._mean_np) / self._std_np)


def new_model(device, init: Optional[Path] = None):
    """(model, Preprocess, tokenizer) of the study's architecture; ``init``: an exported model.pt to start from
    (loaded as the trainer loads ``model.pretrained``). Random weights follow torch's global seed."""
    model, _, eval_transform, tokenizer = build_model(ModelConfig(name=MODEL, pretrained=str(init) if init else None),
                                                      device)
    return model, Preprocess(model, eval_transform), tokenizer


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class RunSpec:
    """One training run: the trainer's optimizer and loss schemas, the batch, the seed, the initial weights."""
    optim: OptimConfig
    loss: LossConfig
    batch: int
    seed: int
    init: Optional[Path] = None
    """An exported model.pt that fine-tuning starts from (None: random initialisation from ``seed``)."""
    context: Dict = field(default_factory=dict)
    """Whatever else the saved result depends on (the study: the data sizes and the probe's settings)."""

    def record(self) -> Dict:
        """What identifies the run's result: a saved run is reused only when this is equal (JSON-normalised)."""
        init = None if self.init is None else {"run": Path(self.init).parent.name, "sha256": file_digest(self.init)}
        return json.loads(json.dumps({"format": RUN_FORMAT, "model": MODEL, "optim": asdict(self.optim),
                                      "loss": asdict(self.loss), "batch": self.batch, "seed": self.seed,
                                      "init": init, **self.context}))


class Probe:
    """What the study watches while a run trains (``train_in_process``'s probe), on ``size`` fixed val pairs
    every ``every`` steps and at the last (step ``last``; train_run records on those steps):

    - ``probe_share_per_lambda``: ‖∇ w·(C_in + C_cross)‖ / ‖∇ L_clip‖ w.r.t. the pairs' features at the
      model's clamped logit scale, with w = N_ref/size (λ = 1 stated at ``reference_batch``, as the study
      states λ); the share is linear in w, so at λ it is λ × this (train/losses/diagnostics.py);
    - ``probe_alignment``, ``probe_uniformity``: Wang & Isola's alignment over the pairs and uniformity of
      the union of both modalities (train/evaluate/metrics.py, as the evaluation reports them).

    Eval mode and no_grad for the features (the tiny ViT has no dropout, and nothing random is drawn), so a
    probed run trains bit-identically to an unprobed one.
    """

    def __init__(self, split: Split, tokenizer, preprocess: Preprocess, size: int, every: int, last: int,
                 reference_batch: Optional[int], max_logit_scale: float, device):
        if size > len(split.labels):
            raise ValueError(f"probe_size {size} > the {len(split.labels)} val pairs; lower probe_size or raise val_size")
        self.images = preprocess.batch(split.images[:size], device)
        self.texts = tokenizer(split.captions[:size]).to(device)
        self.every, self.last, self.max_logit_scale = every, last, max_logit_scale
        self.unit = reference_batch / size if reference_batch else 1.0

    def __call__(self, step: int, model: torch.nn.Module) -> Dict[str, float]:
        from train.evaluate.metrics import alignment, uniformity
        from train.losses.diagnostics import regulariser_share

        if step % self.every and step != self.last:
            return {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            image = model.encode_image(self.images, normalize=True).float().cpu()
            text = model.encode_text(self.texts, normalize=True).float().cpu()
            scale = min(float(model.logit_scale.exp()), self.max_logit_scale)
        model.train(was_training)
        return {"probe_share_per_lambda": regulariser_share(image, text, scale, self.unit),
                "probe_alignment": alignment(image, text), "probe_uniformity": uniformity(torch.cat([image, text]))}


def train_run(spec: RunSpec, split: Split, tokens: Tokens, device, log=print,
              probe: Optional[Callable[[int, torch.nn.Module], Dict[str, float]]] = None) -> tuple:
    """Train one model in this process through the trainer's core; returns (model in eval mode, the loss
    records of train_in_process: every RECORD_EVERY steps and the last, with ``probe``'s values where it ran)."""
    torch.manual_seed(spec.seed)
    model, preprocess, _ = new_model(device, spec.init)
    if spec.loss.clip_logit_scale is not None:
        # Store the fixed scale in the model, so the records and the evaluation use the scale it was
        # fine-tuned with (the reference evaluates with the τ it trains with); the objective gives the
        # parameter a zero gradient, so it stays.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(spec.loss.clip_logit_scale))
    batches = ((preprocess.batch(split.images[idx], device), tokens[idx].to(device))
               for idx in epoch_batches(len(split.labels), spec.batch, spec.seed))

    def progress(record: dict) -> None:
        if record["step"] % 100 == 0:
            log(f"  step {record['step']}/{spec.optim.steps}: loss {record['loss']:.4f}, "
                f"scale {record['logit_scale']:.1f}")

    # records wherever the probe is due, so it runs every ``probe.every`` steps whatever that spacing
    record_every = math.gcd(RECORD_EVERY, probe.every) if isinstance(probe, Probe) else RECORD_EVERY
    records = train_in_process(model, batches, spec.optim, spec.loss, spec.seed, record_every=record_every,
                               log=progress, probe=probe)
    return model, records


def save_model(model: torch.nn.Module, path: Path, max_logit_scale: float) -> None:
    """The trainer's export format (plain open_clip state dict, scalar logit scale clamped as in training)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(export_state_dict(model.state_dict(), max_logit_scale), tmp)
    tmp.replace(path)


def save_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
