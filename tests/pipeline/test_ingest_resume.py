"""kill -9 `python -m pipeline run` (its whole process group, like a node crash) in the middle of
download, dedup and reshard, rerun it, and require exactly the final shards of an uninterrupted
run: no duplicated sample, no missing one, no half-written tar under its final name."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo.http_server import LoopbackServer
from tests.harness.ingest_helpers import ROOT, BadWebHandler, pipeline_cmd, read_all_samples, run_pipeline

pytestmark = pytest.mark.slow
N = 600
ARGS = ["download.image_size=24", "download.number_sample_per_shard=100", "download.processes_count=1",
        "download.thread_count=4", "dedup.partitions=3", "reshard.samples_per_shard=40", "num_workers=1"]


def _tar_digests(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*.tar"))}


def _assert_final_tars_complete(out: Path) -> None:
    """Any tar under its final name must be whole: every member readable to its end."""
    for path in out.glob("*/*.tar"):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert members and len(members) % 3 == 0, path
            for m in members:
                assert len(tar.extractfile(m).read()) == m.size, path


def _run_and_kill_when(urls: Path, out: Path, condition, timeout=300) -> bool:
    """Start a run; SIGKILL its process group once condition() holds. True if it was killed."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(pipeline_cmd("run", "--urls", str(urls), "--out", str(out), *ARGS), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        assert proc.returncode == 0, f"run ended with {proc.returncode} before the kill point"
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kill_9_anywhere_then_rerun_gives_identical_shards(tmp_path):
    with LoopbackServer(handler=BadWebHandler) as server:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(f"img/{i % 550}.jpg") for i in range(N)],  # 50 URL dups
                                 "caption": [f"generated picture {i}" for i in range(N)]}), urls)
        reference = tmp_path / "reference"
        run_pipeline("run", "--urls", str(urls), "--out", str(reference), *ARGS)

        out = tmp_path / "crashy"
        work = out / "_work"
        kill_points = {
            "download": lambda: len(list(work.glob("download/part-*/0*_stats.json"))) >= 2,
            "dedup": lambda: any(work.glob("dedup/by_url/_reduced-*.json")),
            "reshard": lambda: len(list(out.glob("train/*.tar"))) >= 2,
        }
        killed = []
        for stage, condition in kill_points.items():
            if _run_and_kill_when(urls, out, condition):
                killed.append(stage)
                assert not (out / "manifest.json").exists()
                _assert_final_tars_complete(out)
        assert killed == list(kill_points), f"kills landed only in {killed}"
        run_pipeline("run", "--urls", str(urls), "--out", str(out), *ARGS)

    assert _tar_digests(out) == _tar_digests(reference)
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text()) == ref_summary
    assert ref_summary["written"] == 550 and ref_summary["duplicates_by"]["url"] == 50
    keys = [s["__key__"] for split in read_all_samples(out).values() for s in split]
    assert len(keys) == len(set(keys)) == 550
