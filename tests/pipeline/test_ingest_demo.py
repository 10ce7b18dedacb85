"""The embedded demo data set through the real path: Fashion-MNIST files -> URL list -> loopback
HTTP -> img2dataset -> stages. The held-out test split never reaches the training shards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.demo.source import CLASSNAMES, FASHION_MNIST_DIR, SYNONYMS, load_split, read_idx
from tests.harness.ingest_helpers import free_port, read_all_samples, run_pipeline

needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=(
    f"{FASHION_MNIST_DIR} missing: `make setup-system` installs Debian's dataset-fashion-mnist as root"))


@needs_fmnist
def test_idx_reader_on_the_real_files():
    images, labels = load_split("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10


def test_idx_reader_rejects_other_files(tmp_path):
    import gzip
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))  # float IDX: not ours
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(path)


@needs_fmnist
@pytest.mark.slow
def test_demo_builds_disjoint_train_and_test_sets(tmp_path):
    out = tmp_path / "fmnist"
    run_pipeline("demo", "--out", str(out), "--port", str(free_port()), "--train-per-class", "20",
                 "--test-per-class", "8", "dedup.partitions=2", "reshard.samples_per_shard=64")
    test_out = Path(f"{out}_test")
    train_samples, test_samples = read_all_samples(out), read_all_samples(test_out)
    assert set(train_samples) == {"train", "val"} and set(test_samples) == {"test"}
    train_all = [s for v in train_samples.values() for s in v]
    summary = json.loads((out / "summary.json").read_text())
    # Exact accounting from the source the demo served: 200 URLs, none bad; the duplicates are the
    # repeated image files (Fashion-MNIST holds a few byte-identical images), each counted once.
    source = Path(f"{out}_source")
    urls = pq.read_table(source / "train.parquet")["url"].to_pylist()
    distinct = len({hashlib.sha256((source / "images" / "train" / u.rsplit("/", 1)[1]).read_bytes()).digest()
                    for u in urls})
    assert summary["input_rows"] == len(urls) == len(set(urls)) == 200
    assert summary["failed"] == {} and summary["filtered"] == {}
    assert summary["duplicates_by"] == {"url": 0, "content": 200 - distinct} and summary["duplicates"] == 200 - distinct
    assert len(train_all) == summary["written"] == distinct
    assert len(test_samples["test"]) == json.loads((test_out / "summary.json").read_text())["written"] == 80
    _, train_labels = load_split("train")
    _, test_labels = load_split("test")
    for samples, split, labels in ((train_all, "train", train_labels), (test_samples["test"], "test", test_labels)):
        for s in samples:
            meta = json.loads(s["json"])
            assert f"/{split}/" in meta["url"]  # nothing crosses between the two sets
            index = int(meta["url"].rsplit("/", 1)[1].split(".")[0])
            assert meta["label"] == labels[index]  # the real Fashion-MNIST label of that very image
            name = CLASSNAMES[meta["label"]]  # the caption names that very class (or a synonym of it)
            assert any(noun in s["txt"].decode() for noun in [name, *SYNONYMS[name]])
    assert np.bincount([json.loads(s["json"])["label"] for s in test_samples["test"]]).tolist() == [8] * 10
    for folder in (out, test_out):
        assert (folder / "classnames.txt").read_text().splitlines() == CLASSNAMES


def test_demo_on_a_busy_port_says_which_and_how_to_choose_another(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(tmp_path / "d"), "--fast",
                              "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "--port N" in out.stderr
    assert not (tmp_path / "d").exists()  # nothing half-built
