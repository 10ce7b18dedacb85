"""One image decoder for the trainer's loader and the evaluator: which tar member holds the image, and its pixels.

Member lookup: a sample is ``{'__key__': key, ext: bytes}`` (WebDataset grouping). Extensions match without
regard to case, as in webdataset, which lower-cases them when it groups members (``KEY.JPG`` is the ``jpg``
member). The image member is the extension the manifest records (``fields['image']``, the ingestion's
``download.encode_format``); a sample without it falls back to the first of IMAGE_EXTS it holds.

Pixels: PIL, fully loaded, in the file's own mode (the evaluator's corruptions work on ``L`` images as they
are; callers convert to RGB for the model). 16-bit greyscale (PIL's ``I;16*`` modes, and ``I`` for a 16-bit
PNG) is scaled to 8 bits as the ingestion's fetch front does (pipeline/stages/fetch.py: round(v / 257)), where
PIL's own conversion would clip every value above 255 to white. (16-bit colour PNGs PIL already reads as 8-bit
RGB, keeping each value's high byte: at most 1 below the ingestion's rounding.)
"""
from __future__ import annotations

import io
from typing import Mapping, Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image extensions a sample may hold, in the order a fallback looks for them."""


def find_member(raw: Mapping[str, object], ext: str) -> Optional[str]:
    """The key of ``raw`` whose extension is ``ext`` in any case, or None."""
    wanted = ext.lower()
    if wanted in raw:
        return wanted
    return next((k for k in raw if k != "__key__" and k.lower() == wanted), None)


def image_member(raw: Mapping[str, object], image_ext: str = "jpg") -> Optional[str]:
    """The key of the sample's image member: ``image_ext`` if present, else the first of IMAGE_EXTS; None
    when it has no image."""
    for ext in (image_ext, *IMAGE_EXTS):
        key = find_member(raw, ext)
        if key is not None:
            return key
    return None


def decode_image(data: bytes) -> Image.Image:
    """The decoded image of a member's bytes (loaded, so the bytes may go); 16-bit greyscale as 8-bit ``L``
    (round(v / 257)); any other mode as PIL decodes it. Raises on bytes PIL cannot decode."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        pixels = np.asarray(image, dtype=np.float64)    # "I" from a PNG: 16-bit greyscale, 0..65535
        return Image.fromarray(np.rint(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8), "L")
    return image
