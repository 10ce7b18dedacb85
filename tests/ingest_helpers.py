"""Shared helpers for the ingestion tests: image bytes, a loopback server with bad routes, and
running `python -m pipeline` as a user would (a subprocess)."""
from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    from pipeline.manifest import read_manifest

    manifest = read_manifest(dataset)
    out = {}
    for split in manifest.splits:
        ds = wds.WebDataset(manifest.shard_paths(split), shardshuffle=False, empty_check=False)
        out[split] = list(ds)
    return out
