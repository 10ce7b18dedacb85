"""Trainer pieces that need no process group: configs, launcher discovery, LR."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import yaml
from submitit.helpers import TorchDistributedEnvironment

from common.config_loader import ConfigError, load_config
from train.config import TrainConfig
from train.core.distributed import discover_launcher_env
from train.config import ModelConfig
from train.model.build import build_model
from train.core.schedule import cosine_lr
from common.paths import REPO_ROOT

ROOT = REPO_ROOT


@pytest.mark.parametrize("name", ["pretrain_cyclip", "pretrain_clip", "finetune_m2mix", "finetune_plain",
                                  "scale/vitb32_cyclip_16x8", "scale/vitb16_m2mix_finetune_4x8"])
def test_shipped_configs_load(name):
    """Every value written in the shipped file reaches the typed config (read back with plain YAML);
    a command-line override beats the file."""
    path = ROOT / "configs" / f"{name}.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["optim"]["steps"] != 3
    cfg = load_config(TrainConfig, path, ["optim.steps=3"])
    for section, values in written.items():
        for key, value in values.items():
            expected = 3 if (section, key) == ("optim", "steps") else value
            assert getattr(getattr(cfg, section), key) == expected, f"{section}.{key}"
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


# --- launcher discovery: real environments, submitit's TorchDistributedEnvironment as the reference --

SLURM_JOB = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SUBMITIT_EXECUTOR": "slurm"}


def task(node: int, local: int, **extra) -> dict:
    """The variables SLURM gives task `local` on node `node` of SLURM_JOB (8 tasks per node)."""
    return {**SLURM_JOB, "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local),
            "SLURM_PROCID": str(8 * node + local), **extra}


@pytest.fixture
def environ(monkeypatch):
    """Run discovery in exactly the environment given (launcher variables of this process removed)."""
    def run(env: dict, reference: bool = False) -> dict:
        for key in list(os.environ):
            if key.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_")) or key in (
                    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if reference:  # what submitit itself derives in this environment
            ref = TorchDistributedEnvironment()
            return {"RANK": str(ref.rank), "WORLD_SIZE": str(ref.world_size), "LOCAL_RANK": str(ref.local_rank),
                    "MASTER_ADDR": ref.master_addr, "MASTER_PORT": str(ref.master_port)}
        found = discover_launcher_env()
        assert {k: os.environ[k] for k in found} == found  # exported for DeepSpeed, not only returned
        return found
    return run


def test_slurm_tasks_of_one_job_agree_on_the_rendezvous(environ):
    first, last = environ(task(0, 0)), environ(task(1, 7, LOCAL_RANK="3"))  # a stale LOCAL_RANK loses
    assert (first["RANK"], first["WORLD_SIZE"], first["LOCAL_RANK"]) == ("0", "16", "0")
    assert (last["RANK"], last["WORLD_SIZE"], last["LOCAL_RANK"]) == ("15", "16", "7")
    assert first["MASTER_ADDR"] == last["MASTER_ADDR"] == "gpu07"  # the first host of the node list
    assert first["MASTER_PORT"] == last["MASTER_PORT"]
    assert last == environ(task(1, 7), reference=True)
    # Another job (or another task of a job array) on the same nodes gets another port.
    other = environ(task(0, 0, SLURM_JOB_ID="123457"))
    assert other["MASTER_PORT"] != first["MASTER_PORT"] and other == environ(task(0, 0, SLURM_JOB_ID="123457"),
                                                                           reference=True)
    array = [environ(task(0, 0, SLURM_ARRAY_JOB_ID="123456", SLURM_ARRAY_TASK_ID=str(i)))["MASTER_PORT"]
             for i in (0, 1)]
    assert len({*array, first["MASTER_PORT"]}) == 3


def test_bare_srun_step_and_explicit_rendezvous(environ):
    srun = {k: v for k, v in task(1, 2).items() if k != "SUBMITIT_EXECUTOR"}
    found = environ({**srun, "SLURM_STEP_ID": "0"})
    assert found == environ(task(1, 2), reference=True) and found["RANK"] == "10"
    pinned = environ(task(1, 2, MASTER_ADDR="10.0.0.1", MASTER_PORT="4242"))  # set by the user: they win
    assert (pinned["MASTER_ADDR"], pinned["MASTER_PORT"], pinned["RANK"]) == ("10.0.0.1", "4242", "10")


def test_submitit_local_executor(environ):
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
             "SUBMITIT_LOCAL_LOCALID": "1"}
    found = environ(local)
    assert found == environ(local, reference=True)
    assert (found["RANK"], found["WORLD_SIZE"], found["MASTER_ADDR"]) == ("1", "2", socket.gethostname())


def test_torchrun_wins_and_nothing_set_is_one_process(environ):
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert environ({**task(1, 7), **torchrun}) == torchrun  # torchrun inside a SLURM allocation
    single = environ({})
    port = int(single.pop("MASTER_PORT"))
    assert single == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as sock:    # a port nothing listens on: a group of one can bind it
        sock.bind(("127.0.0.1", port))


def test_cosine_schedule_warmup_and_floor():
    cfg = TrainConfig().optim
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps = 1.0, 0.1, 4, 14
    lrs = [cosine_lr(s, cfg) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[9], 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lrs[14], 0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
