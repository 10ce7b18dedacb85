"""A data mixture (``data.sources``) through the whole trainer: real DeepSpeed ranks over gloo, real kill -9.

References: the same mixture trained uninterrupted on 1 rank (sample keys step by step, the loss trajectory) and
its own loss log bit for bit after a kill -9 on the same world size. Three launches and two partial ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.paths import REPO_ROOT
from tests.harness.data_fixtures import make_digits_dataset
from tests.harness.rank_launcher import launch_ranks, wait_ranks
from tests.train.core.test_train_deepspeed import assert_same_trajectory, exported, kill9_at_step, metrics, sample_keys

pytestmark = pytest.mark.slow


class MixRuns:
    def __init__(self, root: Path):
        self.root = root
        # train keys 0..127, val keys 128..159: two sources of one folder, told apart by their keys
        self.data = make_digits_dataset(root / "digits", n_train=128, n_val=32, shard_size=16)
        self.reference = None

    def args(self, name: str) -> list[str]:
        sources = f"[{{path: {self.data}, weight: 3, name: web}}, {{path: {self.data}, weight: 1, name: curated, split: val}}]"
        return ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.sources={sources}",
                f"run.run_dir={self.root / name}", "data.global_batch_size=16", "data.num_workers=1", "data.streams=2",
                "optim.steps=12", "optim.warmup_steps=2", "optim.lr=1e-3", "checkpoint.every_steps=4",
                "zero.stage=1", "run.resume=latest", "logging.progress_bar=false", "logging.tensorboard=false",
                "logging.log_sample_keys=true"]

    def run(self, world: int, name: str, extra=()) -> list[int]:
        return wait_ranks(launch_ranks(self.root, name, world, self.args(name) + list(extra)), 400)

    def kill9_at(self, world: int, name: str, step: int, extra=()) -> None:
        kill9_at_step(launch_ranks(self.root, name, world, self.args(name) + list(extra)),
                      self.root / name / "sample_keys" / "rank0.jsonl", step)

    def ref(self) -> Path:
        if self.reference is None:
            assert self.run(1, "ref") == [0], f"see {self.root}/ref.rank0.log"
            self.reference = self.root / "ref"
        return self.reference


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> MixRuns:
    return MixRuns(tmp_path_factory.mktemp("mix_e2e"))


def test_each_step_takes_the_shares_and_metrics_log_each_source(mix):
    ref = mix.ref()
    for step, keys in sample_keys(ref, 0).items():  # 16 = 2 streams x (6 web + 2 curated)
        assert ["curated" if int(k) >= 128 else "web" for k in keys] == (["web"] * 6 + ["curated"] * 2) * 2, step
    last = metrics(ref)[-1]
    # web: 128 samples / 12 per step = 10 steps per epoch; curated: 32 / 4 = 8 steps per epoch
    assert (last["data/web/samples"], last["data/web/epoch"]) == (12 * 12, 1)
    assert (last["data/curated/samples"], last["data/curated/epoch"]) == (12 * 4, 1)


def test_kill9_then_resume_on_another_world_size_continues_the_mixture(mix):
    """2 ranks x 1 worker are killed -9 mid-run; 1 rank with 0 workers resumes from the last checkpoint (a
    universal-checkpoint conversion: ZeRO-1 on another world size) and trains every step on the samples of the
    uninterrupted 1-rank run; before the kill, rank 0 + rank 1 = the 1-rank batch."""
    ref = mix.ref()
    mix.kill9_at(2, "elastic", 6)
    assert (mix.root / "elastic" / "checkpoints" / "latest").read_text() == "step_00000004"
    assert mix.run(1, "elastic", ["data.num_workers=0"]) == [0], f"see {mix.root}/elastic.rank0.log"
    one, r0, r1 = sample_keys(ref, 0), sample_keys(mix.root / "elastic", 0), sample_keys(mix.root / "elastic", 1)
    assert all((r0[s] if s >= 4 else r0[s] + r1[s]) == one[s] for s in range(12))
    assert_same_trajectory(metrics(mix.root / "elastic"), metrics(ref))


def test_kill9_then_resume_on_the_same_world_size_is_bit_exact(mix):
    ref = mix.ref()
    mix.kill9_at(1, "killed", 9)
    assert (mix.root / "killed" / "checkpoints" / "latest").read_text() == "step_00000008"
    assert mix.run(1, "killed") == [0], f"see {mix.root}/killed.rank0.log"
    assert sample_keys(mix.root / "killed", 0) == sample_keys(ref, 0)
    assert [r["loss"] for r in metrics(mix.root / "killed")] == [r["loss"] for r in metrics(ref)]
    for key, value in exported(ref).items():
        assert torch.equal(exported(mix.root / "killed")[key], value), key
