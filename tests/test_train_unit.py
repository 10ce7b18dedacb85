"""Trainer pieces that need no process group: configs, launcher discovery, LR."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from common.config_loader import ConfigError, load_config
from train.config import TrainConfig
from train.distributed import discover_launcher_env, slurm_master_port
from train.model import ModelConfig, build_model
from train.trainer import cosine_lr

ROOT = Path(__file__).resolve().parent.parent


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


# The loader's order, resume, bad-data and format tests live in tests/test_loader*.py.


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
