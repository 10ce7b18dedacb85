"""Trainer pieces that need no process group: configs, data order, corrupt data, launcher discovery, LR."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from tests.data_fixtures import make_digits_dataset
from train import data as data_lib
from train.config import TrainConfig
from train.distributed import discover_launcher_env, slurm_master_port
from train.model import ModelConfig, build_model
from train.trainer import cosine_lr

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "ds", n_train=96, n_val=16, shard_size=32)


@pytest.fixture(scope="module")
def tiny():
    model, train_transform, eval_transform, tokenizer = build_model(ModelConfig())
    return train_transform, tokenizer


@pytest.mark.parametrize("name", ["pretrain_cyclip", "pretrain_clip", "finetune_m2mix", "finetune_plain",
                                  "scale/vitb32_cyclip_16x8", "scale/vitb16_m2mix_finetune_4x8"])
def test_shipped_configs_load(name):
    cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml", ["optim.steps=3"])
    assert cfg.optim.steps == 3
    if name == "pretrain_clip":  # the baseline is CyCLIP with both regulariser weights at zero
        cyclip = load_config(TrainConfig, ROOT / "configs" / "pretrain_cyclip.yaml")
        assert (cfg.loss.cyclip_in_modal, cfg.loss.cyclip_cross_modal) == (0.0, 0.0)
        assert (cyclip.loss.cyclip_in_modal, cyclip.loss.cyclip_cross_modal) == (0.25, 0.25)


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="optim.stepz"):
        load_config(TrainConfig, None, ["optim.stepz=3"])
    with pytest.raises(ConfigError, match="zero.stage"):
        load_config(TrainConfig, None, ["zero.stage=5"])
    with pytest.raises(ConfigError, match="accum_freq"):
        load_config(TrainConfig, None, ["data.global_batch_size=10", "data.accum_freq=3"]).check_world_size(2)


def test_tiny_model_builds_with_nonscalar_logit_scale():
    model, _, _, tokenizer = build_model(ModelConfig())
    assert model.logit_scale.shape == (1,)
    assert tokenizer(["a photo of the digit three"]).shape == (1, 32)
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)


def test_order_two_ranks_equal_one_rank_and_resume_is_a_slice(digits, tiny):
    transform, tokenizer = tiny
    one = list(data_lib.build_exact_loader(str(digits), "train", 16, 0, 1, 7, 0, 9, transform, tokenizer, 0))
    two = [list(data_lib.build_exact_loader(str(digits), "train", 16, r, 2, 7, 0, 9, transform, tokenizer, 1))
           for r in range(2)]
    for step, (a, b0, b1) in enumerate(zip(one, *two)):
        assert a["keys"] == b0["keys"] + b1["keys"], step
        assert torch.equal(a["image"], torch.cat([b0["image"], b1["image"]])), step  # same augmentations
        assert torch.equal(a["text"], torch.cat([b0["text"], b1["text"]]))
    # 96 samples / 16 = 6 steps per epoch: each epoch visits every sample once, in a new order
    epoch0 = [k for batch in one[:6] for k in batch["keys"]]
    epoch1 = [k for batch in one[6:9] for k in batch["keys"]]
    assert len(set(epoch0)) == 96 and epoch1 != epoch0[:48]
    # resuming at step 4 yields exactly steps 4.. of the uninterrupted order, pixels included
    resumed = list(data_lib.build_exact_loader(str(digits), "train", 16, 0, 1, 7, 4, 9, transform, tokenizer, 0))
    for a, b in zip(one[4:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])


def _corrupt_copy(digits: Path, dest: Path) -> Path:
    """A copy whose shard 1 is truncated mid-file and whose shard 0 has one undecodable JPEG."""
    shutil.copytree(digits, dest)
    shard0 = dest / "train" / "000000.tar"
    raw = bytearray(shard0.read_bytes())
    jpeg_at = raw.find(b"\xff\xd8\xff")  # first JPEG's magic: overwrite its payload with junk
    raw[jpeg_at:jpeg_at + 400] = b"\x00" * 400
    shard0.write_bytes(bytes(raw))
    shard1 = dest / "train" / "000001.tar"
    shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 3])
    return dest


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(digits, tiny, tmp_path):
    transform, tokenizer = tiny
    bad = _corrupt_copy(digits, tmp_path / "bad")
    loader = data_lib.build_exact_loader(str(bad), "train", 16, 0, 1, 0, 0, 6, transform, tokenizer, 0)
    batches = list(loader)
    seen = [k for batch in batches for k in batch["keys"]]
    skipped = sum(batch["skipped"] for batch in batches)
    assert all(batch["image"].shape[0] == 16 for batch in batches)  # substitutes keep every batch full
    # Reference: which samples are readable, by plain per-sample decoding.
    dataset = data_lib.IndexedShardDataset(str(bad), "train", transform, tokenizer, 0)
    unreadable = []
    for index in range(len(dataset)):
        try:
            dataset.read(0, index)
        except Exception:
            unreadable.append(index)
    assert 1 + 32 - 32 // 3 <= len(unreadable) <= 33  # the bad JPEG + most of the truncated shard
    order = data_lib.GlobalBatchOrder(len(dataset), 16, 0, 1, 0)
    visited = [i for step in range(6) for _, i in order.rank_slice(step)]
    assert skipped >= sum(i in unreadable for i in visited) > 0
    assert not set(seen) & {f"{i:014d}" for i in unreadable}


def test_streaming_path_yields_full_batches_and_counts_corrupt(digits, tiny, tmp_path):
    transform, tokenizer = tiny
    bad = _corrupt_copy(digits, tmp_path / "bad")
    loader = data_lib.build_streaming_loader(str(bad), "train", 8, 0, 0, 0, transform, tokenizer, 0, 16)
    batches, shard0_keys = [], 0
    for batch in loader:  # read until shard 0 (which holds the bad JPEG) has surely been streamed through
        batches.append(batch)
        shard0_keys += sum(int(key) < 32 for key in batch["keys"])
        if shard0_keys >= 64 or len(batches) >= 400:
            break
    assert shard0_keys >= 64, "the resampled stream never visited shard 0"
    assert all(batch["image"].shape == (8, 3, 32, 32) for batch in batches)
    assert sum(batch["skipped"] for batch in batches) >= 1  # the bad JPEG (and the truncated shard) are counted


def test_streaming_path_is_a_function_of_seed_rank_and_start_step(digits, tiny):
    transform, tokenizer = tiny

    def keys(rank: int, seed: int, start_step: int) -> list:
        loader = data_lib.build_streaming_loader(str(digits), "train", 8, rank, seed, start_step,
                                                 transform, tokenizer, 0, 16)
        return [key for _, batch in zip(range(6), loader) for key in batch["keys"]]

    reference = keys(0, 0, 0)
    assert keys(0, 0, 0) == reference  # reproducible, not seeded from pid/time
    assert keys(1, 0, 0) != reference and keys(0, 1, 0) != reference and keys(0, 0, 5) != reference


def test_launcher_discovery_slurm_torchrun_single():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    found = discover_launcher_env(dict(slurm))
    assert found["RANK"] == "5" and found["WORLD_SIZE"] == "8" and found["LOCAL_RANK"] == "1"
    expected_host = "gpu07"
    if shutil.which("scontrol") is None:  # without scontrol the first host is parsed from the list
        assert found["MASTER_ADDR"] == expected_host
    assert found["MASTER_PORT"] == str(slurm_master_port("123456")) == str(20000 + 123456 % 20000)
    env = dict(slurm, MASTER_ADDR="10.0.0.1", MASTER_PORT="4242")  # explicit values win
    assert discover_launcher_env(env)["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "4242"
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert discover_launcher_env(dict(torchrun))["RANK"] == "1"
    if not any(k.startswith("SUBMITIT_") for k in os.environ):
        single = discover_launcher_env({})
        assert (single["RANK"], single["WORLD_SIZE"], single["LOCAL_RANK"]) == ("0", "1", "0")


def test_cosine_schedule_warmup_and_floor():
    cfg = TrainConfig().optim
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps = 1.0, 0.1, 4, 14
    lrs = [cosine_lr(s, cfg) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[9], 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lrs[14], 0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
