"""A copy of the run's checkpoints on an object store (``checkpoint.remote``, any fsspec URL), for a fresh node.

Layout under REMOTE/checkpoints/::

    step_00000123/      the files of one local checkpoint (train/core/checkpoint.py), uploaded as they are
    latest              JSON {latest, step, checkpoints, files}: the newest complete upload, the uploads kept
                        (checkpoint.keep_last) and the latest's files with their sizes

Assumption: checkpoints are written to RUN_DIR on a filesystem all ranks share (as the local checkpoints already
require), so rank 0 alone uploads a whole checkpoint once it is complete locally (renamed into place, local
``latest`` replaced). Object stores have no rename, so ``latest`` is the commit: it is written only after every
file of the checkpoint was uploaded and its size checked, and old uploads are pruned only after it names the new
one. A resume downloads exactly the files ``latest`` lists, into ``.partial_download_*`` then renamed.

Uploads run in one background thread, at most one in flight: the next save (before it prunes local folders) and
the trainer's close (end of training, stop/requeue, error) wait for it. A file that fails is retried with
exponential backoff (``checkpoint.remote_retries``); a checkpoint that still fails is given up in one log line,
training goes on, and the remote ``latest`` keeps naming the previous complete upload.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("train")
POINTER = "latest"
DOWNLOAD_PREFIX = ".partial_download_"  # the checkpoint manager removes stale .partial_* folders at start


class RemoteCheckpoints:
    """REMOTE/checkpoints/ of one run: upload (background, rank 0), read the pointer, download."""

    def __init__(self, url: str, storage_options: Optional[dict] = None, keep_last: int = 0, retries: int = 3,
                 backoff_s: float = 1.0):
        import fsspec

        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        if (fsspec.core.split_protocol(self.url)[0] or "file") in ("file", "local"):
            options.setdefault("auto_mkdir", True)  # a folder (tests, a mounted bucket): make the parents
        self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        self.root = root.rstrip("/") + "/checkpoints"
        self.keep_last, self.retries, self.backoff_s = keep_last, max(0, retries), backoff_s
        self.fresh = False  # run.resume=none: the remote's old checkpoints are not this run's (set by start_over)
        self._thread: Optional[threading.Thread] = None
        self.failed: list = []  # names whose upload was given up (tests, summaries)

    # ---------------------------------------------------------------- reading
    def pointer(self) -> Optional[dict]:
        """The remote ``latest`` (a dict), or None when the remote holds no complete checkpoint."""
        self.fs.invalidate_cache()
        try:
            data = self.fs.cat_file(f"{self.root}/{POINTER}")
        except FileNotFoundError:
            return None
        pointer = json.loads(data)
        if not isinstance(pointer, dict) or "latest" not in pointer or "files" not in pointer:
            raise ValueError(f"{self.url}/checkpoints/{POINTER} is not a checkpoint pointer")
        return pointer

    def read_file(self, name: str, filename: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{name}/{filename}")

    def load_torch(self, name: str, filename: str) -> dict:
        """A small torch file of a remote checkpoint (its trainer state), without downloading the checkpoint."""
        import torch

        return torch.load(io.BytesIO(self.read_file(name, filename)), map_location="cpu", weights_only=True)

    def download_latest(self, local_dir: Path, latest_file: str = "latest") -> Optional[Path]:
        """Download the checkpoint the remote pointer names into LOCAL_DIR/<name> (via a temporary folder, then a
        rename) and make LOCAL_DIR/``latest_file`` name it. None when the remote holds none."""
        from common.atomic_files import atomic_write_text

        pointer = self.pointer()
        if pointer is None:
            return None
        name = pointer["latest"]
        local_dir = Path(local_dir)
        tmp, final = local_dir / (DOWNLOAD_PREFIX + name), local_dir / name
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        for rel, size in pointer["files"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._retry(f"download {rel}", lambda: self._get(f"{self.root}/{name}/{rel}", target, size))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(local_dir / latest_file, name)
        log.info("checkpoint.remote: downloaded %s/checkpoints/%s (%d files, %.1f MB) in %.1f s", self.url, name,
                 len(pointer["files"]), sum(pointer["files"].values()) / 1e6, time.perf_counter() - t0)
        return final

    # ---------------------------------------------------------------- uploading
    def start_over(self) -> None:
        """A fresh start (run.resume=none): this run's first upload replaces the pointer, and the remote's older
        checkpoints are pruned once it names this run's (a warning now if there are any)."""
        self.fresh = True
        try:
            pointer = self.pointer()
        except Exception:  # noqa: BLE001 - only a warning; the upload will report an unreachable store
            pointer = None
        if pointer is not None:
            log.warning("run.resume=none: starting over; the checkpoints in %s/checkpoints (latest %s) are replaced "
                        "once this run's first checkpoint is uploaded", self.url, pointer["latest"])

    def start_upload(self, folder: Path) -> None:
        """Upload the complete local checkpoint FOLDER in the background (after the previous upload ended)."""
        self.wait()
        self._thread = threading.Thread(target=self._upload_or_report, args=(Path(folder),),
                                        name="checkpoint-upload", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) has finished or been given up."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _upload_or_report(self, folder: Path) -> None:
        t0 = time.perf_counter()
        try:
            size = self._upload(folder)
        except Exception as err:  # noqa: BLE001 - whatever it is, training goes on; this line reports it
            self.failed.append(folder.name)
            log.warning("checkpoint.remote: upload of %s to %s/checkpoints failed, given up (%s); the remote latest "
                        "is unchanged, training goes on", folder.name, self.url, " ".join(str(err).split())[:300])
            return
        log.info("checkpoint.remote: uploaded %s to %s/checkpoints (%.1f MB in %.1f s)", folder.name, self.url,
                 size / 1e6, time.perf_counter() - t0)

    def _upload(self, folder: Path) -> int:
        name = folder.name
        files = {p.relative_to(folder).as_posix(): p.stat().st_size
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        old = self._retry("read the pointer", self.pointer)
        if old is not None and name in old.get("checkpoints", [old["latest"]]):
            # A run that started over re-uploads a name the pointer lists: unname it before overwriting its files.
            self._retry("remove the pointer", lambda: self.fs.rm_file(f"{self.root}/{POINTER}"))
        for rel, size in files.items():
            self._retry(f"upload {rel}", lambda: self._put(folder / rel, f"{self.root}/{name}/{rel}", size))
        kept = [] if self.fresh or old is None else [n for n in old.get("checkpoints", []) if n < name]
        kept = (kept + [name])[-self.keep_last:] if self.keep_last > 0 else kept + [name]
        pointer = {"latest": name, "step": _step_of(name), "checkpoints": kept, "files": files}
        self._retry("write the pointer", lambda: self.fs.pipe_file(f"{self.root}/{POINTER}",
                                                                   json.dumps(pointer, indent=1).encode()))
        self.fresh = False
        self._prune(kept)
        return sum(files.values())

    def _prune(self, kept: list) -> None:
        """Remove every remote step_* folder the pointer does not keep (old, failed or another run's uploads)."""
        try:
            self.fs.invalidate_cache()
            entries = self.fs.ls(self.root, detail=False)
            for path in entries:
                base = path.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith("step_") and base not in kept:
                    self.fs.rm(path, recursive=True)
        except Exception as err:  # noqa: BLE001 - the pointer is written; leftovers go at the next prune
            log.warning("checkpoint.remote: pruning %s/checkpoints failed (%s)", self.url,
                        " ".join(str(err).split())[:200])

    def _put(self, local: Path, remote: str, size: int) -> None:
        self.fs.put_file(str(local), remote)
        self.fs.invalidate_cache(remote)
        got = self.fs.size(remote)
        if got != size:
            raise OSError(f"{remote}: {got} bytes on the remote, {size} local")

    def _get(self, remote: str, local: Path, size: int) -> None:
        self.fs.get_file(remote, str(local))
        if local.stat().st_size != size:
            raise OSError(f"{remote}: {local.stat().st_size} bytes downloaded, {size} listed")

    def _retry(self, what: str, fn: Callable):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - any failure of a remote call is retried alike
                if attempt == self.retries:
                    raise OSError(f"{what}: {type(err).__name__}: {err} ({attempt + 1} attempts)") from err
                time.sleep(delay)
                delay *= 2
                self.fs.invalidate_cache()


def _step_of(name: str) -> Optional[int]:
    try:
        return int(name.split("_")[1])
    except (IndexError, ValueError):
        return None


def remote_from_config(checkpoint_cfg) -> Optional[RemoteCheckpoints]:
    """The RemoteCheckpoints of ``cfg.checkpoint``, or None when checkpoint.remote is empty."""
    if not checkpoint_cfg.remote:
        return None
    return RemoteCheckpoints(checkpoint_cfg.remote, checkpoint_cfg.storage_options, checkpoint_cfg.keep_last,
                             checkpoint_cfg.remote_retries, checkpoint_cfg.remote_retry_backoff_s)


def checked_remote(checkpoint_cfg) -> Optional[RemoteCheckpoints]:
    """remote_from_config for preflight: InputError (one line) for a URL or options fsspec cannot open."""
    from common.errors import InputError

    try:
        return remote_from_config(checkpoint_cfg)
    except (ImportError, ValueError, TypeError) as err:  # unknown protocol, its package missing, bad options
        raise InputError(f"checkpoint.remote={checkpoint_cfg.remote}: {' '.join(str(err).split())[:200]}") from None


def checked_pointer(remote: RemoteCheckpoints) -> Optional[dict]:
    """The remote's pointer for preflight (None: no checkpoint there); InputError when it cannot be read."""
    from common.errors import InputError

    try:
        return remote.pointer()
    except Exception as err:  # noqa: BLE001 - unreachable store, bad credentials, a foreign file: one line
        raise InputError(f"checkpoint.remote={remote.url}: cannot read its checkpoints/{POINTER} "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
