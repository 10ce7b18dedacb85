"""One image decoder for the trainer's loader and the evaluator: which tar member holds the image, and its pixels.

Member lookup: a sample is ``{'__key__': key, ext: bytes}`` (WebDataset grouping). Extensions match without
regard to case, as in webdataset, which lower-cases them when it groups members (``KEY.JPG`` is the ``jpg``
member). The image member is the extension the manifest records (``fields['image']``, the ingestion's
``download.encode_format``); a sample without it falls back to the first of IMAGE_EXTS it holds.

Pixels: the image the ingestion would have stored for the same bytes, i.e. its fetch front's normaliser
(pipeline/stages/fetch.py ``normalize_image``) followed by img2dataset's decode, so shards made by other tools
train on the pixels ours would hold:

* more than 8 bits per sample scaled to 8 bits: 16-bit (PIL's ``I;16*`` modes, ``I`` from a PNG, and 16-bit
  RGB/RGBA PNGs, which PIL itself cuts to their high byte) as round(v / 257), 32-bit float (``F``) as
  round(clip(v, 0, 1) * 255). PIL's own conversion would clip every 16-bit value above 255 to white.
  A 32-bit integer ``I`` TIFF stays ``I``, as the ingestion passes it unchanged.
* EXIF orientation 2-8 applied (pixels turned upright, as PIL's ``ImageOps.exif_transpose``).
* transparency (RGBA, LA, PA, P or RGB with a transparent colour) composited onto white as img2dataset
  does: round(alpha / 255 * colour + 255 - alpha); the result is ``L`` for LA, else ``RGB``. (A grey PNG's
  transparent colour is ignored, as cv2 ignores it in the ingestion.)

Anything else is returned loaded, in the file's own mode (the evaluator's corruptions work on ``L`` images as
they are; callers convert to RGB for the model). Each rule costs a look at the mode or the header unless it
applies; the decoding is otherwise PIL's.
"""
from __future__ import annotations

import io
from typing import Mapping, Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image extensions a sample may hold, in the order a fallback looks for them."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose)."""


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
    """The decoded image of a member's bytes, loaded (so the bytes may go), normalised as the module doc says:
    8 bits per sample, upright, transparency on white. Raises on bytes PIL cannot decode."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.format == "PNG" and data[:8] == PNG_SIGNATURE and data[24:25] == b"\x10" and data[25] in (2, 4, 6):
        pixels = _deep_colour_png(data)  # 16-bit colour (or grey + alpha): PIL would keep the high byte
        out = Image.fromarray(pixels, {2: "L", 3: "RGB", 4: "RGBA"}[1 if pixels.ndim == 2 else pixels.shape[2]])
    elif image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        pixels = np.asarray(image, dtype=np.float64)  # "I" from a PNG: 16-bit greyscale, 0..65535
        out = Image.fromarray(np.rint(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        out = Image.fromarray(np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    else:
        out = image
    orientation = _orientation(image)
    if orientation in ORIENTATIONS:
        out = out.transpose(ORIENTATIONS[orientation])
    if out.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (out.mode in ("P", "RGB") and "transparency" in out.info):
        out = _on_white(out)
    return out


def _orientation(image: Image.Image) -> int:
    if "exif" not in image.info:  # the common case: no EXIF block, nothing parsed
        return 1
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored (the ingestion does the same)
        return 1


def _deep_colour_png(data: bytes) -> np.ndarray:
    """A 16-bit colour PNG's pixels as uint8 round(v / 257), RGB(A) order (cv2 reads all 16 bits; PIL cannot)."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("a 16-bit PNG that cannot be decoded")
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / 257.0).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(pixels)


def _on_white(image: Image.Image) -> Image.Image:
    """Transparency composited onto white, img2dataset's formula (resizer.py): rint(a/255 * c + 255 - a)."""
    grey = image.mode in ("LA", "La")
    rgba = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.float64)
    alpha = rgba[..., -1:]
    pixels = np.rint(np.clip(alpha / 255 * rgba[..., :-1] + 255 - alpha, 0, 255)).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
