"""The shard-format contract end to end: `download.encode_format=png|webp` ingests, trains and evaluates.

Real path: img2dataset fetches JPEGs from a loopback HTTP server and re-encodes them; the reshard
stage records the extension (and writes each shard's sample index) in the manifest; the trainer and
the evaluator read the extension from there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo.http_server import LoopbackServer
from common.shard_folder import read_manifest
from tests.harness.ingest_helpers import BadWebHandler, run_pipeline
from common.paths import REPO_ROOT

ROOT = REPO_ROOT
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ext,quality", [("png", 6), ("webp", 90)])  # png: compression level 0-9
def test_encode_format_trains_and_evaluates(tmp_path, ext, quality):
    from train.evaluate.data import iter_samples

    (tmp_path / "urls").mkdir()
    with LoopbackServer(handler=BadWebHandler) as server:
        pq.write_table(pa.table({"url": [server.url(f"img/{i}.jpg") for i in range(40)],
                                 "caption": [f"a picture of thing number {i}" for i in range(40)]}),
                       tmp_path / "urls" / "part0.parquet")
        out = tmp_path / "out"
        run_pipeline("run", "--urls", str(tmp_path / "urls"), "--out", str(out), f"download.encode_format={ext}",
                     f"download.encode_quality={quality}", "download.image_size=32", "dedup.partitions=2", "reshard.samples_per_shard=8",
                     "reshard.val_fraction=0.2")
    manifest = read_manifest(out)
    assert manifest.fields["image"] == ext and manifest.fields["sample_hash"] == "sha256"
    shard = manifest.split("train").shards[0]
    assert shard.image_ext == ext and (out / shard.index).is_file()
    with tarfile.open(out / shard.path) as tar:
        assert {m.name.rsplit(".", 1)[1] for m in tar} == {ext, "txt", "json"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "train", f"data.path={out}", f"run.run_dir={run_dir}", "data.global_batch_size=8",
         "data.num_workers=1", "optim.steps=3", "optim.warmup_steps=1", "checkpoint.every_steps=100",
         "logging.every_steps=1", "logging.eval_every_steps=3", "logging.eval_split=val",
         "logging.progress_bar=false", "logging.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["skipped_samples"] == 0
    assert any(key.startswith("eval/") for key in records[-1])  # the periodic evaluation read the val split
    val = list(iter_samples(out, "val"))
    assert len(val) == manifest.split("val").num_samples > 0 and all(s.image.size == (32, 32) for s in val)
