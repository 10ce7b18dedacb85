"""checkpoint.remote on a real S3 server (SeaweedFS, benchmarks/s3_server.py) with real `python -m train` runs.

One store and one set of trainings per module: an uninterrupted run with the remote (the reference weights, and
what the remote holds afterwards), a run stopped at step 6 whose run_dir is then thrown away, its continuation in an
empty run_dir from the remote (a fresh node), and a run whose store dies mid-run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.s3_server import SeaweedS3, weed_binary
from common.errors import ConfigError, InputError
from common.paths import REPO_ROOT
from tests.harness.data_fixtures import make_digits_dataset

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS not installed (make setup)")]
STEPS, EVERY, KEEP = 12, 4, 2
BUCKET = "ckpt"
GIVEN_UP = "checkpoint.remote: upload of"


def train_args(data: Path, run_dir: Path, remote: str, storage_options: dict, *extra: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={data}",
            f"run.run_dir={run_dir}", "data.global_batch_size=16", "data.num_workers=1", f"optim.steps={STEPS}",
            "optim.warmup_steps=2", "optim.lr=1e-3", f"checkpoint.every_steps={EVERY}", f"checkpoint.keep_last={KEEP}",
            "logging.progress_bar=false", "logging.tensorboard=false", f"checkpoint.remote={remote}",
            f"checkpoint.storage_options={json.dumps(storage_options)}", "run.resume=latest", *extra]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(clean, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "train", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env(), cwd=log.parent)


def run(args: list[str], log: Path) -> int:
    return start(args, log).wait(timeout=400)


def exported(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "open_clip_model.safetensors")


def pointer(fs, prefix: str) -> dict | None:
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(f"{BUCKET}/{prefix}/checkpoints/latest"))
    except FileNotFoundError:
        return None


def remote_folders(fs, prefix: str) -> list[str]:
    """The checkpoint folders holding files (SeaweedFS keeps an emptied folder as a directory entry; S3 does not)."""
    fs.invalidate_cache()
    root = f"{BUCKET}/{prefix}/checkpoints/"
    return sorted({p[len(root):].split("/")[0] for p in fs.find(root) if p[len(root):].startswith("step_")})


def assert_complete(fs, prefix: str, ptr: dict) -> None:
    """Every file the pointer lists is on the store with the listed size."""
    fs.invalidate_cache()
    for rel, size in ptr["files"].items():
        assert fs.size(f"{BUCKET}/{prefix}/checkpoints/{ptr['latest']}/{rel}") == size, rel
    assert {"trainer_state.pt", "mp_rank_00_model_states.pt"} <= set(ptr["files"])


class Runs:
    def __init__(self, root: Path, s3: SeaweedS3):
        self.root, self.s3 = root, s3
        self.data = make_digits_dataset(root / "digits", n_train=128, n_val=16, shard_size=32)
        s3.fs.mkdir(BUCKET)

    def args(self, name: str, prefix: str, *extra: str, storage_options: dict | None = None) -> list[str]:
        return train_args(self.data, self.root / name, f"s3://{BUCKET}/{prefix}",
                          storage_options or self.s3.storage_options, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_ckpt")
    with SeaweedS3(root / "weed") as s3:
        runs = Runs(root, s3)
        # At once: the uninterrupted reference, uploading to s3://ckpt/ref, and a run stopped after 6 steps
        # (checkpoints 4 and 6 uploaded to s3://ckpt/resumed), which then continues on a "fresh node".
        ref = start(runs.args("ref", "ref"), root / "ref.log")
        code = run(runs.args("stopped", "resumed", "run.stop_after_steps=6"), root / "stopped.log")
        assert code == 3, (root / "stopped.log").read_text()[-3000:]
        assert ref.wait(timeout=400) == 0, (root / "ref.log").read_text()[-3000:]
        runs.stopped_pointer = pointer(s3.fs, "resumed")
        shutil.rmtree(root / "stopped")
        assert run(runs.args("fresh_node", "resumed"), root / "fresh_node.log") == 0, \
            (root / "fresh_node.log").read_text()[-3000:]
        yield runs


def test_a_run_uploads_keep_last_checkpoints_and_a_pointer_to_the_newest(runs):
    fs, log = runs.s3.fs, (runs.root / "ref.log").read_text()
    ptr = pointer(fs, "ref")
    assert ptr["latest"] == "step_00000012" and ptr["step"] == STEPS
    assert ptr["checkpoints"] == ["step_00000008", "step_00000012"]
    assert remote_folders(fs, "ref") == ["step_00000008", "step_00000012"]  # step 4 pruned after the pointer
    assert_complete(fs, "ref", ptr)
    local = runs.root / "ref" / "checkpoints" / "step_00000012"
    assert ptr["files"] == {p.name: p.stat().st_size for p in local.iterdir()}
    assert log.count("checkpoint.remote: uploaded step_") == 3 and GIVEN_UP not in log


def test_resume_in_an_empty_run_dir_from_the_remote_is_bit_exact(runs):
    assert runs.stopped_pointer["latest"] == "step_00000006"
    log = (runs.root / "fresh_node.log").read_text()
    checkpoints = runs.root / "fresh_node" / "checkpoints"
    assert "checkpoint.remote: downloaded s3://ckpt/resumed/checkpoints/step_00000006" in log
    assert f"resumed from {checkpoints / 'step_00000006'} at step 6" in log
    assert not list(checkpoints.glob(".partial_*"))
    for key, value in exported(runs.root / "ref").items():
        assert torch.equal(exported(runs.root / "fresh_node")[key], value), key
    # The continuation kept uploading: the remote holds its last two checkpoints (step 6 of the first node pruned).
    ptr = pointer(runs.s3.fs, "resumed")
    assert ptr["checkpoints"] == ["step_00000008", "step_00000012"]
    assert remote_folders(runs.s3.fs, "resumed") == ["step_00000008", "step_00000012"]


def test_preflight_compares_and_refuses_against_the_remote(runs, tmp_path):
    from common.config_loader import load_config
    from train.config import TrainConfig
    from train.core.preflight import check_resume

    def check(*extra: str):
        args = runs.args("empty", "resumed", *extra)
        return check_resume(load_config(TrainConfig, args[1], args[2:]))

    with pytest.raises(ConfigError, match=r"s3://ckpt/resumed/checkpoints/step_00000012 was trained with other "
                                          r"settings \(optim.lr: 0.001 -> 0.002\)"):
        check("optim.lr=2e-3")
    assert "run already finished at step 12" in check("checkpoint.export=false")["message"]  # the remote's latest
    assert check("optim.steps=16") is None
    with pytest.raises(InputError, match="already holds checkpoints .latest step_00000012.: run.resume=latest"):
        check("run.resume=")
    assert check("run.resume=none") is None
    assert check("run.resume=latest", "checkpoint.remote=s3://ckpt/nothing_here") is None


def test_a_store_that_dies_mid_run_is_reported_and_training_finishes(runs, tmp_path):
    with SeaweedS3(tmp_path / "weed") as s3:
        s3.fs.mkdir(BUCKET)
        options = dict(s3.storage_options, config_kwargs={"connect_timeout": 1, "read_timeout": 2,
                                                           "retries": {"max_attempts": 1}})
        log_path = tmp_path / "dies.log"
        proc = start(runs.args("dies", "dies", "checkpoint.remote_retries=1", "checkpoint.remote_retry_backoff_s=0.1",
                               storage_options=options), log_path)
        try:
            deadline = time.monotonic() + 300
            while (ptr := pointer(s3.fs, "dies")) is None:  # the first checkpoint is uploaded and named
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            assert ptr["latest"] == "step_00000004"
            assert_complete(s3.fs, "dies", ptr)
            while "step_00000008" not in remote_folders(s3.fs, "dies"):  # the next upload has begun
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.02)
            s3.proc.kill()  # the store dies in the middle of uploading step 8
            s3.proc.wait(timeout=30)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    with SeaweedS3(tmp_path / "weed") as s3:  # the same store, back up: its pointer still names step 4, complete
        ptr = pointer(s3.fs, "dies")
        assert ptr["latest"] == "step_00000004" and ptr["checkpoints"] == ["step_00000004"]
        assert_complete(s3.fs, "dies", ptr)
        s3.fs.invalidate_cache()
        partial = s3.fs.find(f"{BUCKET}/dies/checkpoints/step_00000008")
        assert 0 < len(partial) < len(ptr["files"]), partial  # step 8 is there in part, and not named
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    failed = [line for line in log.splitlines() if GIVEN_UP in line]
    assert [line.split(GIVEN_UP)[1].split()[0] for line in failed] == ["step_00000008", "step_00000012"], failed
    assert all("given up" in line and "training goes on" in line for line in failed)
    # Only aiohttp's own report of the connection the dying store reset ("Task exception was never retrieved",
    # logged by asyncio in fsspec's event loop) may carry a traceback; nothing of the trainer does.
    assert log.count("Traceback") == log.count("Task exception was never retrieved"), log[-3000:]
    assert (runs.root / "dies" / "export" / "open_clip_model.safetensors").is_file()
