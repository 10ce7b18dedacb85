"""Write-then-rename: a reader (or a resumed run) sees the old file or the new one, never half of one.

Kept in-house: the library that did this (``atomicwrites``) is archived, and the rule is a dozen lines.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed over ``path``.

    The temporary name starts with '.' and carries the pid, so concurrent writers (array tasks) do not
    collide and globbing readers skip it. On an exception the temporary file is removed and ``path`` is
    left as it was. Directories are not supported (rename them yourself).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, fsync'd before the rename. Returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
