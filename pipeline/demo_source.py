"""The embedded demo data set: Debian's Fashion-MNIST (70,000 real 28x28 images, 10 classes)
written as image files with template captions, plus URL lists that point at a loopback HTTP
server, so the demo goes through exactly the URL list -> HTTP -> img2dataset path of web data.

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

from pipeline.manifest import atomic_write_text

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a product photo of a {}.", "a centered photo of a {}.", "a grayscale picture of a {}.",
    "a small photo of the {}.", "a catalogue image of a {}.",
]
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


def build_source(folder: Path, split: str, base_url: str, per_class: Optional[int] = None, seed: int = 0) -> Path:
    """Write images under folder/images/<split>/ and the URL list folder/<split>.parquet
    (url, caption, label, class_name). Idempotent; the URL list is written last."""
    url_list = folder / f"{split}.parquet"
    meta = folder / f"{split}.json"
    wanted = {"split": split, "base_url": base_url, "per_class": per_class, "seed": seed}
    if url_list.exists() and meta.exists() and json.loads(meta.read_text()) == wanted:
        return url_list
    images, labels = load_split(split)
    idx = pick_indices(labels, per_class, seed)
    out = folder / "images" / split
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1 if split == "test" else 0])
    urls, captions = [], []
    for i in idx:
        name = f"{i:05d}.png"
        if not (out / name).exists():
            Image.fromarray(images[i], mode="L").save(out / f".{name}.tmp", format="PNG")
            (out / f".{name}.tmp").replace(out / name)
        urls.append(f"{base_url}/{split}/{name}")
        captions.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(CLASSNAMES[labels[i]]))
    table = pa.table({"url": urls, "caption": captions, "label": pa.array(labels[idx].astype(np.int64)),
                      "class_name": [CLASSNAMES[c] for c in labels[idx]]})
    tmp = folder / f".{split}.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(url_list)
    atomic_write_text(meta, json.dumps(wanted))
    return url_list


def write_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "classnames.txt", "\n".join(CLASSNAMES) + "\n")


def demo_sizes(fast: bool) -> Dict[str, Optional[int]]:
    """Images per class: all 6,000/1,000 normally; a balanced subset for FAST=1."""
    return {"train": 500, "test": 100} if fast else {"train": None, "test": None}
