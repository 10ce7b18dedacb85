"""`sbatch slurm/shards.sh` on the throw-away 2-node SLURM cluster: an array task per input part,
then the dependent global job; the dataset equals a local `python -m pipeline run` byte for byte."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo.http_server import LoopbackServer
from tests.harness.ingest_helpers import ROOT, BadWebHandler, run_pipeline
from tests.harness.slurm_cluster import slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
ARGS = ["download.image_size=24", "download.processes_count=1", "download.thread_count=4",
        "dedup.partitions=2", "reshard.samples_per_shard=25"]


def _digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*/*.tar"))}


def test_array_then_global_job_equals_local_run(slurm_cluster, tmp_path):  # noqa: F811
    parts = tmp_path / "parts"
    parts.mkdir()
    with LoopbackServer(handler=BadWebHandler) as server:
        for part in range(2):  # the second part repeats URLs of the first: cross-part duplicates
            ids = range(0, 40) if part == 0 else range(20, 60)
            pq.write_table(pa.table({"url": [server.url(f"img/{i}.jpg") for i in ids],
                                     "caption": [f"picture {i} in part {part}" for i in ids]}),
                           parts / f"part-{part}.parquet")
        local = tmp_path / "local"
        run_pipeline("run", "--urls", str(parts), "--out", str(local), *ARGS)
        cluster_out = tmp_path / "cluster"
        env = {**os.environ, "SHARDS_WAIT": "1", "LOG_ROOT": str(tmp_path / "logs"),
               "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
        proc = subprocess.run(["sbatch", "--wait", "--cpus-per-task=1", f"--output={tmp_path}/submit.log",
                               str(ROOT / "slurm" / "shards.sh"), "--urls", str(parts), "--out", str(cluster_out),
                               *ARGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = (tmp_path / "submit.log").read_text() if (tmp_path / "submit.log").exists() else ""
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log}"
    assert "(2 tasks)" in log
    part_logs = sorted(p.name for p in (tmp_path / "logs").glob("*/part-*.log"))
    assert part_logs == ["part-0.log", "part-1.log"]
    assert _digests(cluster_out) == _digests(local) and _digests(local)
    assert (cluster_out / "summary.json").read_text() == (local / "summary.json").read_text()
    assert json.loads((local / "summary.json").read_text())["duplicates_by"]["url"] == 20
