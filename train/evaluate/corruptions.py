"""Deterministic image corruptions for distribution-shift evaluation (in the spirit of ImageNet-C).

Four corruptions × three severities, applied to PIL images before the eval transform. Randomness
(noise, rotation direction) comes from a generator seeded by (sample key, corruption, severity), so a
corrupted test set is the same on every run, machine and worker order.

Strengths scale with image size where they are spatial (blur radius), so 28-pixel Fashion-MNIST and
224-pixel photos are hurt comparably.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image, ImageFilter

SEVERITIES = (1, 2, 3)

# Per-severity strengths. Noise: std as a fraction of the 0..255 range. Blur: Gaussian radius as a
# fraction of the shorter side. Contrast: factor pulling pixels towards the image mean (1 = unchanged).
# Rotation: degrees, direction drawn per image.
NOISE_STD = {1: 0.08, 2: 0.16, 3: 0.30}
BLUR_FRACTION = {1: 0.02, 2: 0.04, 3: 0.07}
CONTRAST_FACTOR = {1: 0.5, 2: 0.3, 3: 0.15}
ROTATION_DEGREES = {1: 15.0, 2: 30.0, 3: 60.0}


def sample_rng(key: str, corruption: str, severity: int) -> np.random.Generator:
    """A generator that depends only on the sample key and the corruption (not on Python's hash seed)."""
    digest = hashlib.sha256(f"{key}|{corruption}|{severity}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _as_array(img: Image.Image) -> Tuple[np.ndarray, str]:
    mode = img.mode if img.mode in ("L", "RGB") else "RGB"
    return np.asarray(img.convert(mode), dtype=np.float32), mode


def _from_array(arr: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode)


def gaussian_noise(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    arr, mode = _as_array(img)
    return _from_array(arr + rng.normal(0.0, NOISE_STD[severity] * 255.0, arr.shape), mode)


def blur(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    radius = BLUR_FRACTION[severity] * min(img.size)
    return img.filter(ImageFilter.GaussianBlur(radius))


def contrast(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    arr, mode = _as_array(img)
    mean = arr.mean(axis=(0, 1), keepdims=True)
    return _from_array((arr - mean) * CONTRAST_FACTOR[severity] + mean, mode)


def rotation(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    angle = ROTATION_DEGREES[severity] * (1.0 if rng.random() < 0.5 else -1.0)
    # Fill the uncovered corners with the image's border colour, so the shift is the rotation itself
    # and not a new black frame (Fashion-MNIST's border is black anyway).
    arr, mode = _as_array(img)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).reshape(-1, arr.shape[2] if arr.ndim == 3 else 1)
    fill = tuple(int(v) for v in np.median(border, axis=0)) if mode == "RGB" else int(np.median(border))
    return img.convert(mode).rotate(angle, resample=Image.BILINEAR, fillcolor=fill)


CORRUPTIONS: Dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "contrast": contrast,
    "rotation": rotation,
}


def corrupt(img: Image.Image, corruption: str, severity: int, key: str) -> Image.Image:
    """``img`` with ``corruption`` at ``severity`` (1..3), deterministic given the sample ``key``."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{corruption}' (known: {sorted(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    return CORRUPTIONS[corruption](img, severity, sample_rng(key, corruption, severity))
