"""A static file server on 127.0.0.1, for the offline demo and the tests: the same
URL list -> HTTP -> img2dataset path as web data, without leaving the machine."""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once


class LoopbackServer:
    """Serve ``root`` (or use a custom handler class) on 127.0.0.1:<free port> in a thread.

    >>> with LoopbackServer("images") as server:
    ...     server.url("train/0001.png")
    """

    def __init__(self, root: str | Path | None = None, handler=None, port: int = 0):
        if handler is None:
            handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = _Server(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-http", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
