"""The embedded demo data set: Debian's Fashion-MNIST (70,000 real 28x28 images, 10 classes)
written as image files with captions, plus URL lists that point at a loopback HTTP server, so the
demo goes through exactly the URL list -> HTTP -> img2dataset path of web data.

Captions carry per-image information, so that the text-text similarity matrix is not just a class
block matrix (which is what CyCLIP's in-modal term would then ask the images to copy): attributes
measured from each image (object area, brightness, texture, each as a tertile *within the class*),
synonyms of the class noun and superclass words ("footwear", "top"). A share of captions stays
class-only (the zero-shot prompt style), so zero-shot prompts remain in the training distribution.

The train and test splits get separate URL lists and are built into separate dataset folders:
no test image can reach a training shard.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common.atomic_files import atomic_path, atomic_write_text

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a product photo of a {}.", "a centered photo of a {}.", "a grayscale picture of a {}.",
    "a small photo of the {}.", "a catalogue image of a {}.",
]
# Synonyms of each class noun (the class name itself is always one) and its superclass word.
SYNONYMS = {"t-shirt": ["tee", "t-shirt top"], "trouser": ["pair of trousers", "pair of pants"],
            "pullover": ["sweater", "jumper"], "dress": ["frock", "gown"], "coat": ["jacket", "overcoat"],
            "sandal": ["open sandal", "summer sandal"], "shirt": ["button-up shirt", "blouse"],
            "sneaker": ["trainer", "running shoe"], "bag": ["handbag", "tote bag"], "ankle boot": ["boot", "short boot"]}
SUPERCLASS = {"t-shirt": "top", "trouser": "legwear", "pullover": "top", "dress": "one-piece garment",
              "coat": "outerwear", "sandal": "footwear", "shirt": "top", "sneaker": "footwear", "bag": "accessory",
              "ankle boot": "footwear"}
# Words for the within-class tertiles (low, middle, high) of each measured attribute.
ATTRIBUTE_WORDS = {"area": ("small", "medium-sized", "large"), "brightness": ("dark", "grey", "light"),
                   "texture": ("plain", "lightly textured", "patterned")}
ATTRIBUTE_TEMPLATES = ["a photo of a {attrs} {noun}.", "a {attrs} {noun}, a kind of {superclass}.",
                       "{superclass}: a {attrs} {noun}.", "a catalogue image of a {attrs} {noun}.",
                       "a {attrs} {noun} on a black background."]
CLASS_ONLY_SHARE = 0.25
CAPTION_VERSION = 2    # bump when captions change, so cached URL lists are rebuilt
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic (2 zero bytes, dtype code, ndim), dims, data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, root: Path = FASHION_MNIST_DIR):
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install Debian's dataset-fashion-mnist "
                                f"(apt-get install dataset-fashion-mnist; `make setup-system` does it as root)")
    images_file, labels_file = _FILES[split]
    return read_idx(root / images_file), read_idx(root / labels_file)


def pick_indices(labels: np.ndarray, per_class: Optional[int], seed: int) -> np.ndarray:
    """All indices, or the first `per_class` of each class in a seeded order (balanced subset)."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    chosen = np.concatenate([order[labels[order] == c][:per_class] for c in range(len(CLASSNAMES))])
    return np.sort(chosen)


def image_attributes(images: np.ndarray) -> np.ndarray:
    """(n, 3) measured per image (n×H×W uint8): object area (fraction of pixels > 20/255), brightness
    (mean intensity of the object's pixels) and texture (mean absolute neighbour difference inside the
    object, divided by its brightness so that it is not brightness again)."""
    x = images.astype(np.float32)
    mask = x > 20
    area = mask.mean(axis=(1, 2))
    pixels = np.maximum(mask.sum(axis=(1, 2)), 1)
    brightness = (x * mask).sum(axis=(1, 2)) / pixels
    grad = np.zeros_like(x)
    grad[:, :, 1:] += np.abs(np.diff(x, axis=2))
    grad[:, 1:, :] += np.abs(np.diff(x, axis=1))
    texture = (grad * mask).sum(axis=(1, 2)) / pixels / np.maximum(brightness, 1.0)
    return np.stack([area, brightness, texture], axis=1)


def tertiles_within_class(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, a) ints in {0, 1, 2}: each column's tertile among the images of the same class (by rank)."""
    out = np.zeros(values.shape, dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        for j in range(values.shape[1]):
            rank = np.argsort(np.argsort(values[rows, j], kind="stable"), kind="stable")
            out[rows, j] = np.minimum(3 * rank // max(len(rows), 1), 2)
    return out


def make_captions(images: np.ndarray, labels: np.ndarray, seed: int,
                  class_only_share: float = CLASS_ONLY_SHARE) -> list:
    """One caption per image: class-only (prompt style) with probability ``class_only_share``, else 1-3
    of the image's attribute words with a class noun or synonym, some with the superclass word."""
    tertiles = tertiles_within_class(image_attributes(images), labels)
    rng = np.random.default_rng([seed, 7])
    names = list(ATTRIBUTE_WORDS)
    captions = []
    for label, tert in zip(labels, tertiles):
        name = CLASSNAMES[int(label)]
        if rng.random() < class_only_share:
            captions.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(name))
            continue
        chosen = sorted(rng.choice(3, size=rng.integers(1, 4), replace=False))
        attrs = " ".join(ATTRIBUTE_WORDS[names[j]][tert[j]] for j in chosen)
        nouns = [name] + SYNONYMS[name]
        noun = nouns[0] if rng.random() < 0.5 else nouns[rng.integers(1, len(nouns))]
        template = ATTRIBUTE_TEMPLATES[rng.integers(len(ATTRIBUTE_TEMPLATES))]
        captions.append(template.format(attrs=attrs, noun=noun, superclass=SUPERCLASS[name]))
    return captions


def caption_diversity(captions, labels) -> Dict[str, float]:
    """Distinct caption strings overall and per class (mean), and the share of class-only captions."""
    labels = np.asarray(labels)
    per_class = [len({c for c, lab in zip(captions, labels) if lab == k}) for k in np.unique(labels)]
    class_only = {t.format(n) for t in TEMPLATES for n in CLASSNAMES}
    return {"captions": len(captions), "distinct": len(set(captions)),
            "distinct_per_class": float(np.mean(per_class)),
            "class_only_share": float(np.mean([c in class_only for c in captions]))}


def build_source(folder: Path, split: str, base_url: str, per_class: Optional[int] = None, seed: int = 0,
                 class_only_share: float = CLASS_ONLY_SHARE) -> Path:
    """Write images under folder/images/<split>/ and the URL list folder/<split>.parquet
    (url, caption, label, class_name). Idempotent; the URL list is written last. Attribute tertiles
    are computed within each class over this split's chosen images."""
    url_list = folder / f"{split}.parquet"
    meta = folder / f"{split}.json"
    wanted = {"split": split, "base_url": base_url, "per_class": per_class, "seed": seed,
              "captions": CAPTION_VERSION, "class_only_share": class_only_share}
    if url_list.exists() and meta.exists() and json.loads(meta.read_text()) == wanted:
        return url_list
    images, labels = load_split(split)
    idx = pick_indices(labels, per_class, seed)
    out = folder / "images" / split
    out.mkdir(parents=True, exist_ok=True)
    captions = make_captions(images[idx], labels[idx], seed + (1 if split == "test" else 0), class_only_share)
    urls = []
    for i in idx:
        name = f"{i:05d}.png"
        if not (out / name).exists():
            with atomic_path(out / name) as tmp:
                Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
        urls.append(f"{base_url}/{split}/{name}")
    table = pa.table({"url": urls, "caption": captions, "label": pa.array(labels[idx].astype(np.int64)),
                      "class_name": [CLASSNAMES[c] for c in labels[idx]]})
    with atomic_path(url_list) as tmp:
        pq.write_table(table, tmp)
    atomic_write_text(meta, json.dumps(wanted))
    return url_list


def write_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "classnames.txt", "\n".join(CLASSNAMES) + "\n")


def demo_sizes(fast: bool) -> Dict[str, Optional[int]]:
    """Images per class: all 6,000/1,000 normally; a balanced subset for FAST=1."""
    return {"train": 500, "test": 100} if fast else {"train": None, "test": None}
