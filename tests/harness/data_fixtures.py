"""A tiny real image-text dataset in the project's shard format, built offline from scikit-learn digits.

The digits are real 8x8 scans (1,797 of them), upscaled with nearest-neighbour so they stay crisp,
captioned from templates ("a photo of the digit three"). The folder is written exactly as the
ingestion stage writes its output (WebDataset tars + ``common.shard_folder.write_manifest``), so the
trainer and the evaluator read it through the same code path as real data.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from common.shard_folder import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest

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


def corrupt_copy(folder: Path, dest: Path) -> Path:
    """A copy of a dataset folder whose train shard 0 has one undecodable JPEG (400 bytes zeroed from its
    first JPEG marker) and whose train shard 1 is truncated to a third."""
    shutil.copytree(folder, dest)
    shard0 = dest / "train" / "000000.tar"
    raw = bytearray(shard0.read_bytes())
    jpeg_at = raw.find(b"\xff\xd8\xff")
    raw[jpeg_at:jpeg_at + 400] = b"\x00" * 400
    shard0.write_bytes(bytes(raw))
    shard1 = dest / "train" / "000001.tar"
    shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 3])
    return dest


def readable_keys(folder: Path, split: str = "train") -> set:
    """Reference: keys whose image and caption read and decode, by plain tarfile + PIL."""
    good = set()
    for path in read_manifest(folder).shard_paths(split):
        members = {}
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError):
            pass  # truncated: keep what was read before the cut
        for key, parts in members.items():
            try:
                Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
                if parts["txt"].decode().strip():
                    good.add(key)
            except Exception:
                continue
    return good
