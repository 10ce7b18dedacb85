"""Small datasets in CLIP_benchmark's webdataset format, from real Fashion-MNIST images (Debian's
dataset-fashion-mnist), and a runner of the real `clip_benchmark eval` CLI on an export.

The shards are written with plain ``tarfile`` to the layout ``clip_benchmark/datasets/builder.py:
build_wds_dataset`` reads, not with CLIP_benchmark's own writer: the format is checked from both ends.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from benchmarks.digits import CLASS_NAMES, _encode_jpeg

TEMPLATES = ["a photo of a {c}.", "a black and white photo of a {c}.", "a low resolution photo of the {c}.",
             "a product photo of a {c}."]
"""CLIP_benchmark-style templates ({c} = the class name)."""


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="png")
    return buf.getvalue()


def fashion_mnist(per_class: int) -> Tuple[List[Tuple[str, bytes]], List[int], List[str]]:
    """([("png", bytes)], labels, class names): the first ``per_class`` Fashion-MNIST test images of each class,
    classes interleaved so that every shard mixes them."""
    from pipeline.demo.source import CLASSNAMES, load_split

    images, labels = load_split("test")
    by_class = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSNAMES))]
    order = [int(by_class[c][i]) for i in range(per_class) for c in range(len(CLASSNAMES))]
    return [("png", _png(images[i])) for i in order], [int(labels[i]) for i in order], list(CLASSNAMES)


def held_out_digits(n: int, skip: int, image_size: int = 32, seed: int = 0):
    """([("jpg", bytes)], labels, class names): ``n`` sklearn digits after the first ``skip`` of the seeded order
    ``benchmarks.digits.make_digits_dataset`` draws from (so none is in a dataset it made with
    n_train + n_val <= skip), encoded as it encodes them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))[skip:skip + n]
    if len(order) < n:
        raise ValueError(f"only {len(digits.images) - skip} digits after the first {skip}")
    return ([("jpg", _encode_jpeg(digits.images[i], image_size)) for i in order],
            [int(digits.target[i]) for i in order], list(CLASS_NAMES))


def _write_shards(split_dir: Path, samples: Sequence[Dict[str, bytes]], shard_size: int) -> int:
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(samples), shard_size):
        with tarfile.open(split_dir / f"{shards}.tar", "w") as tar:
            for index, sample in enumerate(samples[start:start + shard_size], start):
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"s{index:07d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        shards += 1
    (split_dir / "nshards.txt").write_text(f"{shards}\n")
    return shards


def make_classification_set(root: Path, images: Sequence[Tuple[str, bytes]], labels: Sequence[int],
                            classnames: Sequence[str], templates: Sequence[str] = TEMPLATES, split: str = "test",
                            shard_size: int = 100) -> Path:
    """ROOT/classnames.txt, zeroshot_classification_templates.txt, SPLIT/nshards.txt and SPLIT/{i}.tar with
    ``sNNNNNNN.<image ext>`` + ``sNNNNNNN.cls`` (the label as ASCII digits). Returns ROOT."""
    samples = [{ext: data, "cls": str(label).encode()} for (ext, data), label in zip(images, labels)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    _write_shards(root / split, samples, shard_size)
    return root


def make_retrieval_set(root: Path, images: Sequence[Tuple[str, bytes]], captions: Sequence[Sequence[str]],
                       split: str = "test", shard_size: int = 100) -> Path:
    """ROOT/dataset_type.txt ("retrieval") and shards with each image and its captions in ``.txt``, one per
    line (several captions per image, as COCO and Flickr have). Returns ROOT."""
    samples = [{ext: data, "txt": "\n".join(caps).encode()} for (ext, data), caps in zip(images, captions)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    _write_shards(root / split, samples, shard_size)
    return root


def replace_member(tar_path: Path, name: str, data: bytes) -> None:
    """Rewrite one shard with member ``name`` holding ``data`` instead (e.g. a damaged ``.cls`` label)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    assert any(m.name == name for m, _ in members), f"{tar_path} has no member {name}"
    with tarfile.open(tar_path, "w") as tar:
        for m, old in members:
            new = data if m.name == name else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))


def run_clip_benchmark(export_dir: Path, dataset_root: Path, task: str, out_json: Path, batch_size: int = 64,
                       recall_k: Sequence[int] = (1, 5, 10), split: str = "test") -> Dict[str, float]:
    """``clip_benchmark eval`` (the installed CLI) on an export folder (``--model local-dir:…``), on the CPU, in
    fp32 (``--no_amp``), offline; returns the ``metrics`` of its JSON output."""
    cli = Path(sys.executable).parent / "clip_benchmark"
    cmd = [str(cli), "eval", "--model", f"local-dir:{export_dir}", "--pretrained", "",
           "--dataset", "wds/testset", "--dataset_root", str(dataset_root), "--split", split, "--task", task,
           "--no_amp", "--num_workers", "0", "--batch_size", str(batch_size), "--output", str(out_json),
           "--recall_k", *map(str, recall_k)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"clip_benchmark exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out_json.read_text())["metrics"]
