"""A tiny real image-text dataset in the project's shard format, built offline from scikit-learn digits.

The digits are real 8x8 scans (1,797 of them), upscaled with nearest-neighbour so they stay crisp,
captioned from templates ("a photo of the digit three"). The folder is written exactly as the
ingestion stage writes its output (WebDataset tars + ``common.shard_folder.write_manifest``), so the
trainer and the evaluator read it through the same code path as real data.

The trainer benchmarks (bench_trainer.py, gpu_check.py) train on it; the tests' fixtures
(tests/harness/data_fixtures.py) build on it. It lives here, not under tests/, because benchmarks never
import tests.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from common.shard_folder import Manifest, ShardInfo, SplitInfo, write_manifest

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand.",
             "a scan of the digit {}."]


def _encode_jpeg(pixels_8x8: np.ndarray, size: int) -> bytes:
    gray = (pixels_8x8 * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray, mode="L").resize((size, size), Image.NEAREST).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_digits_dataset(folder: str | os.PathLike, n_train: int = 256, n_val: int = 64, shard_size: int = 64,
                        image_size: int = 32, seed: int = 0) -> Path:
    """Write ``folder`` as a finished dataset (train/val shards, wids indexes, classnames, manifest).

    Samples are drawn without replacement from the 1,797 digits in a seeded order; keys are 14-digit
    strings, unique across both splits. Returns the folder.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n_train + n_val > len(digits.images):
        raise ValueError(f"only {len(digits.images)} digits available, asked for {n_train + n_val}")
    order = np.random.default_rng(seed).permutation(len(digits.images))
    folder = Path(folder)
    rng = np.random.default_rng(seed + 1)
    splits = {}
    start = 0
    for split, count in (("train", n_train), ("val", n_val)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for shard_start in range(0, count, shard_size):
            rel = f"{split}/{len(shards):06d}.tar"
            n_in_shard = min(shard_size, count - shard_start)
            with wds.TarWriter(str(folder / rel)) as sink:
                for offset in range(n_in_shard):
                    idx = int(order[start + shard_start + offset])
                    label = int(digits.target[idx])
                    key = f"{start + shard_start + offset:014d}"
                    caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(CLASS_NAMES[label])
                    meta = {"key": key, "url": f"sklearn://digits/{idx}", "caption": caption, "sha256": "",
                            "width": image_size, "height": image_size, "label": label,
                            "class_name": CLASS_NAMES[label]}
                    sink.write({"__key__": key, "jpg": _encode_jpeg(digits.images[idx], image_size),
                                "txt": caption, "json": json.dumps(meta)})
            shards.append(ShardInfo(path=rel, num_samples=n_in_shard))
        splits[split] = SplitInfo(shards=shards)
        start += count
    (folder / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (folder / "summary.json").write_text(json.dumps({"source": "sklearn digits", "train": n_train, "val": n_val}))
    write_manifest(folder, Manifest(splits=splits, seed=seed))
    return folder
