"""Shared helpers for the ingestion tests: image bytes, a loopback server with bad routes, and
running `python -m pipeline` as a user would (a subprocess)."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
from PIL import Image
from common.net import free_port  # noqa: F401 (the ingestion tests import it from here)
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


def jpeg_bytes(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A PNG whose header declares width x height pixels but whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


class BadWebHandler(BaseHTTPRequestHandler):
    """/img/N.jpg: a distinct valid JPEG; /same/*: identical bytes; the rest: one failure mode each."""

    stall_seconds = 4.0

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, ctype="image/jpeg"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the stall case): expected

    def do_GET(self):  # noqa: N802 - stdlib name
        path = self.path
        if path.startswith("/img/"):
            return self._send(200, jpeg_bytes(int(path.split("/")[-1].split(".")[0])))
        if path.startswith("/same/"):
            return self._send(200, jpeg_bytes(999))
        if path == "/404.jpg":
            return self._send(404, b"not here", "text/plain")
        if path == "/500.jpg":
            return self._send(500, b"boom", "text/plain")
        if path == "/stall.jpg":
            time.sleep(self.stall_seconds)
            return self._send(200, jpeg_bytes(5))
        if path == "/html.jpg":
            return self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
        if path == "/truncated.jpg":
            data = jpeg_bytes(7, size=(64, 64))
            return self._send(200, data[: len(data) // 2])
        if path == "/bomb.png":
            return self._send(200, bomb_png(), "image/png")
        if path == "/empty.jpg":
            return self._send(200, b"")
        return self._send(404, b"", "text/plain")


def pipeline_cmd(*args: str) -> list:
    return [sys.executable, "-m", "pipeline", *args]


def run_pipeline(*args: str, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(pipeline_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_all_samples(dataset: Path) -> dict:
    """{split: [sample dict]} read back with webdataset, from the manifest."""
    import webdataset as wds

    from common.shard_folder import read_manifest

    manifest = read_manifest(dataset)
    out = {}
    for split in manifest.splits:
        ds = wds.WebDataset(manifest.shard_paths(split), shardshuffle=False, empty_check=False)
        out[split] = list(ds)
    return out


# ---- Real-list cases (issue 13): EXIF orientation, 16-bit images, raw non-ASCII URLs, Retry-After.

def upright_image(width=40, height=24) -> np.ndarray:
    """An RGB image whose four quadrants differ, so that every flip and rotation is visible."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = (220, 30, 30)
    img[: height // 2, width // 2:] = (30, 220, 30)
    img[height // 2:, : width // 2] = (30, 30, 220)
    img[height // 2:, width // 2:] = (230, 230, 40)
    return img


# Stored pixels for orientation o: the inverse of the transform that makes them upright.
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}


def exif_oriented(orientation: int, fmt: str = "JPEG") -> bytes:
    """Bytes whose stored pixels, turned upright by EXIF Orientation=orientation, give upright_image()."""
    im = Image.fromarray(upright_image())
    if orientation in _INVERSE:
        im = im.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_raw(pixels: np.ndarray, color_type: int) -> bytes:
    """A PNG written byte by byte (any bit depth / colour type, e.g. 16-bit grey+alpha, which
    neither PIL nor OpenCV writes). pixels: H x W x C of uint8 or big-endian-able uint16."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = pixels.shape[:2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    rows = pixels.reshape(h, -1).astype(">u2" if depth == 16 else np.uint8)
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# name -> (16-bit PNG, its 8-bit twin): mid grey (0x8080 / 128); alpha 0x8080 / 128 where present.
_COLOR_TYPES = {"grey": (0, 1), "la": (4, 2), "rgb": (2, 3), "rgba": (6, 4)}


def deep_png(kind: str, bits: int) -> bytes:
    color_type, channels = _COLOR_TYPES[kind]
    value = 0x8080 if bits == 16 else 0x80
    pixels = np.full((6, 10, channels), value, np.uint16 if bits == 16 else np.uint8)
    if channels in (3, 4):
        pixels[..., 0] = 0x4040 if bits == 16 else 0x40  # red differs: channel order is checked too
    return png_raw(pixels, color_type)


class RealWebHandler(BadWebHandler):
    """BadWebHandler plus the issue-13 routes. Every request is logged with its time.

    /exif/O.jpg|png|webp   EXIF orientation O        /deep/KIND-BITS.png   16-bit PNG or 8-bit twin
    /u/<any path>?<query>  a JPEG for any (UTF-8) path: the logged path shows what was asked
    /ra/MODE/N.jpg         429/503 first (Retry-After seconds / HTTP-date / none), then the image
    /ra/always/N.jpg       always 429 with Retry-After: 1       /long/N.jpg  429 Retry-After: 3600
    """

    log: list = []
    hits: dict = {}

    def _retry_after(self, mode: str):
        if mode == "secs":
            return 429, "1"
        if mode == "date":
            from email.utils import formatdate
            return 429, formatdate(time.time() + 2, usegmt=True)
        if mode == "503":
            return 503, "1"
        if mode == "nohdr":
            return 503, None
        return 429, "1"

    def do_GET(self):  # noqa: N802 - stdlib name
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(self.path)
        path, query = unquote(parts.path), unquote(parts.query)
        RealWebHandler.log.append((time.time(), path, query))
        n = RealWebHandler.hits[path] = RealWebHandler.hits.get(path, 0) + 1
        if path.startswith("/exif/"):
            name = path.split("/")[-1]
            fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.split(".")[1]]
            return self._send(200, exif_oriented(int(name.split(".")[0]), fmt))
        if path.startswith("/deep/"):
            kind, bits = path.split("/")[-1].split(".")[0].split("-")
            return self._send(200, deep_png(kind, int(bits)), "image/png")
        if path.startswith("/u/"):
            return self._send(200, jpeg_bytes(zlib.crc32(path.encode()) % 10_000))
        if path.startswith("/long/"):
            self.send_response(429)
            self.send_header("Retry-After", "3600")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path.startswith("/ra/"):
            mode = path.split("/")[2]
            if mode == "always" or n == 1:
                code, retry_after = self._retry_after(mode)
                self.send_response(code)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._send(200, jpeg_bytes(10_000 + zlib.crc32(path.encode()) % 10_000))
        return super().do_GET()


def assert_balanced(summary: dict) -> None:
    """The accounting invariant of every run: no row vanishes."""
    total = summary["written"] + sum(summary["failed"].values()) + sum(summary["filtered"].values()) + \
        summary["duplicates"]
    assert total == summary["input_rows"], summary


def run_pipeline_raw(*args: str, timeout=120) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` without asserting success (for the error-path tests)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(pipeline_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
