"""The fetch front: img2dataset fetches every image through this small HTTP server on 127.0.0.1,
which fetches the real URL and hands back bytes img2dataset can decode correctly.

Why a front instead of patching img2dataset (1.47.0): its workers are *spawned* processes that
call urllib directly, retry back to back (no sleep, Retry-After ignored), and decode with
cv2.IMREAD_UNCHANGED, which ignores EXIF orientation and hands 16-bit PNGs to code that assumes
8 bits (they come out white). None of that can be configured, and img2dataset stays untouched:
it gets URLs of the form http://127.0.0.1:PORT/f?u=<quoted URL>. Here, per request:

- retries of retryable failures (HTTP 408/429/500/502/503/504, timeouts, resets), each after
  max(Retry-After, backoff * 2**attempt) s (Retry-After as seconds or HTTP-date, RFC 9110 §10.2.3);
  a wait over the cap is not made: the row fails as http_429/503 and the host's other rows fail
  fast until the time it asked for (a host is never hit again before its Retry-After);
- image normalisation: 16-bit images scaled to 8 bits (round(v / 257)), EXIF orientation 2-8
  applied (pixels turned upright, as PIL's ImageOps.exif_transpose), re-encoded losslessly (PNG)
  for img2dataset to decode, composite and resize as any 8-bit image. Other bytes pass unchanged.
- failures are answered with status 599 and the original error text as the reason phrase, which
  img2dataset records as "HTTP Error 599: <text>" and pipeline.stages.download classifies by <text>.

It runs as ``processes`` spawned server processes (like img2dataset's own), rows spread over them
by URL hash; the per-host Retry-After state is per process.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple
from urllib.parse import parse_qs, quote, urlsplit

FAILED = 599
RETRYABLE_CODES = {408, 429, 500, 502, 503, 504}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


@dataclass
class FrontSettings:
    """The download.* knobs the front needs (see pipeline.settings.DownloadConfig for each)."""

    timeout: float = 10.0
    retries: int = 0
    retry_after_cap: float = 60.0
    retry_backoff_s: float = 1.0
    user_agent_token: Optional[str] = None

    @property
    def user_agent(self) -> str:
        if self.user_agent_token:  # as img2dataset builds it, so robots rules for the token still apply
            return f"{USER_AGENT} (compatible; {self.user_agent_token}; +https://github.com/rom1504/img2dataset)"
        return USER_AGENT

    def client_timeout(self) -> float:
        """What img2dataset must wait for one front answer: every try plus every allowed wait."""
        tries = self.retries + 1  # each: a wait at the host's gate, the request, a backoff sleep (+10% jitter)
        return tries * (self.timeout + 2.1 * self.retry_after_cap) + 5


class FetchFailed(Exception):
    """The final failure of one URL; the message is what img2dataset would have recorded."""


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (past dates give 0)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HostGate:
    """Per origin (scheme, host, port): the time before which it must not be asked again, and the
    status that said so."""

    def __init__(self):
        self._lock = threading.Lock()
        self._until: Dict[str, Tuple[float, int]] = {}

    def defer(self, host: str, until: float, code: int) -> None:
        with self._lock:
            if until > self._until.get(host, (0.0, 0))[0]:
                self._until[host] = (until, code)

    def not_before(self, host: str) -> Tuple[float, int]:
        with self._lock:
            return self._until.get(host, (0.0, 0))


def _is_retryable_error(err: Exception) -> bool:
    text = str(err).lower()
    return "timed out" in text or "reset" in text or "remote end closed" in text or "incompleteread" in text


def fetch(url: str, s: FrontSettings, gate: HostGate, opener=None) -> Tuple[bytes, list]:
    """GET ``url`` with retries and Retry-After. Returns (body, X-Robots-Tag values)."""
    opener = opener or urllib.request.build_opener()
    parts = urlsplit(url)
    host = f"{parts.scheme}://{parts.netloc}"  # the origin (RFC 6454): what a Retry-After speaks for
    last = "no attempt"
    for attempt in range(s.retries + 1):
        until, code = gate.not_before(host)
        wait = until - time.time()
        if wait > s.retry_after_cap:
            raise FetchFailed(f"HTTP Error {code}: host asked to wait {wait:.0f} s (> download.retry_after_cap)")
        if wait > 0:
            time.sleep(wait)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": s.user_agent})
            with opener.open(request, timeout=s.timeout) as response:
                return response.read(), response.headers.get_all("X-Robots-Tag") or []
        except urllib.error.HTTPError as err:
            last = f"HTTP Error {err.code}: {err.reason}"
            if err.code not in RETRYABLE_CODES:
                raise FetchFailed(last) from None
            asked = retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
            delay = max(asked or 0.0, s.retry_backoff_s * 2 ** attempt)
            if asked is not None:
                gate.defer(host, time.time() + asked, err.code)
        except Exception as err:  # noqa: BLE001 - URLError, socket errors, bad status lines ...
            last = str(err)
            if not _is_retryable_error(err):
                raise FetchFailed(last) from None
            delay = s.retry_backoff_s * 2 ** attempt
        if attempt == s.retries or delay > s.retry_after_cap:
            break
        time.sleep(delay * (1 + 0.1 * random.random()))  # jitter: the retries of many rows spread out
    raise FetchFailed(last)


# EXIF orientation -> array op giving the upright image (PIL's exif_transpose, on H x W [x C]).
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: a[::-1].swapaxes(0, 1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: a[:, ::-1].swapaxes(0, 1),
}


def _orientation_and_depth(body: bytes) -> Tuple[int, bool]:
    """(EXIF orientation, more than 8 bits per sample) from the headers only."""
    deep = body[:8] == PNG_SIGNATURE and len(body) > 24 and body[24] == 16  # IHDR bit depth
    try:
        from PIL import Image

        with Image.open(io.BytesIO(body)) as im:  # lazy: reads the headers, not the pixels
            deep = deep or im.mode in ("I", "F") or im.mode.startswith("I;16")
            if im.format == "TIFF":
                deep = deep or any(b > 8 for b in (im.tag_v2.get(258) or (8,)))
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - not an image PIL knows (img2dataset will judge), or a bomb
        return 1, deep
    return orientation, deep


def normalize_image(body: bytes) -> bytes:
    """Bytes img2dataset's 8-bit cv2 path decodes correctly: see the module docstring."""
    orientation, deep = _orientation_and_depth(body)
    if orientation not in _ORIENT and not deep:
        return body
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)  # no orientation applied
    if img is None:
        return body  # img2dataset decides (decode_error, too_many_pixels)
    if img.dtype == np.uint16:
        img = np.rint(img / 257.0).astype(np.uint8)
    elif img.dtype.kind == "f":
        img = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        return body
    if orientation in _ORIENT:
        img = np.ascontiguousarray(_ORIENT[orientation](img))
    ok, png = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return png.tobytes() if ok else body


def _phrase(text: str) -> str:
    """A status-line reason phrase: one line of latin-1."""
    return " ".join(text.split())[:400].encode("latin-1", "replace").decode("latin-1")


class _FrontHandler(BaseHTTPRequestHandler):
    settings: FrontSettings
    gate: HostGate

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - stdlib name
        url = parse_qs(urlsplit(self.path).query).get("u", [""])[0]
        try:
            body, robots = fetch(url, self.settings, self.gate)
            body = normalize_image(body)
        except FetchFailed as err:
            self.send_response(FAILED, _phrase(str(err)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        for value in robots:  # img2dataset applies its X-Robots-Tag rules to what we pass on
            self.send_header("X-Robots-Tag", value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def _serve(settings: FrontSettings, conn) -> None:
    handler = type("Handler", (_FrontHandler,), {"settings": settings, "gate": HostGate()})
    server = _Server(("127.0.0.1", 0), handler)
    conn.send(server.server_address[1])
    conn.close()
    server.serve_forever()


class FetchFront:
    """``processes`` front servers for the duration of a ``with`` block.

    >>> with FetchFront(FrontSettings(retries=2), processes=2) as front:
    ...     front.url_for("https://example.com/a.jpg")
    """

    def __init__(self, settings: FrontSettings, processes: int = 1):
        self.settings = settings
        self.processes = max(1, processes)
        self.ports: list = []
        self._procs: list = []

    def __enter__(self) -> "FetchFront":
        ctx = multiprocessing.get_context("spawn")  # safe with threads; same as img2dataset's pool
        try:
            for _ in range(self.processes):
                parent, child = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_serve, args=(self.settings, child), daemon=True, name="fetch-front")
                proc.start()
                self._procs.append(proc)
                child.close()
                if not parent.poll(120):
                    raise RuntimeError("the fetch front did not start within 120 s")
                self.ports.append(parent.recv())
            for port in self.ports:  # listening before img2dataset sends the first request
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
        except BaseException:
            self.__exit__()
            raise
        return self

    def url_for(self, url: str) -> str:
        port = self.ports[hash_url(url) % len(self.ports)]
        return f"http://127.0.0.1:{port}/f?u={quote(url, safe='')}"

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.join(timeout=10)


def hash_url(url: str) -> int:
    return zlib.crc32(url.encode("utf-8", "surrogatepass"))

