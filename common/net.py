"""Ports on this machine: the one ``free_port`` of the project (launchers, tests, benchmarks, the demo).

Torch-free and standard library only, so a launcher or a shell-side helper can use it before anything heavy loads.
"""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (the kernel picks it; the socket is closed again).

    Another process may take it before the caller binds it: a caller that cannot tolerate that retries
    with a fresh port (as torch's rendezvous would fail with EADDRINUSE).
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_pair(offset: int, host: str = "127.0.0.1", attempts: int = 100) -> int:
    """A port p such that p and p + ``offset`` are both free now (SeaweedFS puts each gRPC port at its
    HTTP port + 10000). RuntimeError after ``attempts`` draws."""
    for _ in range(attempts):
        port = free_port(host)
        if port + offset >= 65536:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port pair (p, p + {offset}) on {host} after {attempts} tries")
