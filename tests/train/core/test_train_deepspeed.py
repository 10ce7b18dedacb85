"""The trainer end to end: real DeepSpeed processes over gloo on CPU, real shards, real kills.

Every run is `python -m train` in fresh processes (RANK/WORLD_SIZE/... set as a launcher would).
Runs are shared between tests (see RUNS) so the whole file costs ten launches.

Tolerances: a resumed run on the same world size must equal the uninterrupted one bit for bit
(same reductions in the same order on CPU). Runs on different rank counts or with accumulation
reduce gradients in a different order; their losses agree to float32 rounding, which Adam then
carries along: we require rtol 1e-4 (or 1e-5 absolute: the CyCLIP terms fall to ~1e-4) on every logged
loss term and 1e-4 absolute on the final weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.harness.data_fixtures import corrupt_copy, make_digits_dataset
from tests.harness.rank_launcher import launch_ranks, wait_ranks
from common.paths import REPO_ROOT

pytestmark = pytest.mark.slow
ROOT = REPO_ROOT
LOSS_RTOL, LOSS_ATOL, WEIGHT_ATOL = 1e-4, 1e-5, 1e-4


class Runs:
    """Launches trainings on demand and remembers them for the other tests of the module."""

    def __init__(self, root: Path):
        self.root = root
        self.data = make_digits_dataset(root / "digits", n_train=128, n_val=16, shard_size=32)
        self.done: dict[str, Path] = {}

    def base(self, name: str) -> list[str]:
        return ["--config", str(ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={self.data}",
                f"run.run_dir={self.root / name}", "data.global_batch_size=16", "data.num_workers=1",
                "optim.steps=12", "optim.warmup_steps=2", "optim.lr=1e-3", "checkpoint.every_steps=4",
                "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_sample_keys=true"]

    def launch(self, world: int, args: list[str], **launch_kwargs) -> list[subprocess.Popen]:
        name = Path(next(a for a in args if a.startswith("run.run_dir=")).split("=", 1)[1]).name
        return launch_ranks(self.root, name, world, args, **launch_kwargs)

    def run(self, world: int, args: list[str], timeout: float = 400, **launch_kwargs) -> list[int]:
        return wait_ranks(self.launch(world, args, **launch_kwargs), timeout)

    def get(self, name: str, world: int, overrides: list[str], expect=(0,)) -> Path:
        if name not in self.done:
            codes = self.run(world, self.base(name) + overrides)
            assert set(codes) <= set(expect), f"{name}: exit codes {codes}, see {self.root}/{name}.rank*.log"
            self.done[name] = self.root / name
        return self.done[name]

    # The shared runs -------------------------------------------------------------------------
    def ref_1rank(self) -> Path:  # 1 rank x global batch 16, ZeRO-1
        return self.get("ref_1rank", 1, ["zero.stage=1"])

    def zero2_2ranks(self) -> Path:  # 2 ranks x 8
        return self.get("zero2_2ranks", 2, ["zero.stage=2"])

    def zero3_2ranks_accum(self) -> Path:  # 2 ranks x 2 micro-batches of 4, features cached
        return self.get("zero3_2ranks_accum", 2, ["zero.stage=3", "data.accum_freq=2"])

    def zero1_2ranks_then_1rank(self) -> Path:
        """2 ranks are preempted (SIGUSR1 to rank 1 only) mid-run; the run continues on 1 rank."""
        name = "elastic"
        if name not in self.done:
            args = self.base(name) + ["zero.stage=1", "run.resume=latest"]
            procs = self.launch(2, args)
            keys = self.root / name / "sample_keys" / "rank0.jsonl"
            try:
                wait_for_step(keys, 5, procs)
                os.kill(procs[1].pid, signal.SIGUSR1)
                codes = [p.wait(timeout=120) for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            # both ranks agreed to stop at the same step boundary, checkpointed and asked for a requeue
            assert codes == [3, 3], f"preempted ranks exited with {codes}, see {self.root}/{name}.rank*.log"
            self.preempted_at = (self.root / name / "checkpoints" / "latest").read_text()
            assert self.preempted_at < "step_00000012"
            codes = self.run(1, args)
            assert codes == [0], f"elastic resume failed, see {self.root}/{name}.rank0.log"
            self.done[name] = self.root / name
        return self.done[name]


def wait_for_step(keys_file: Path, step: int, procs: list, timeout: float = 300) -> None:
    """Block until a rank's sample-key log shows it has started ``step`` (0-based)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if keys_file.exists() and any(json.loads(l)["step"] >= step for l in keys_file.read_text().splitlines()):
            return
        assert all(p.poll() is None for p in procs), "a rank ended before the test could interrupt it"
        time.sleep(0.05)
    raise TimeoutError(f"{keys_file} never reached step {step}")


def kill9_at_step(procs: list, keys_file: Path, step: int) -> None:
    """SIGKILL every rank once ``keys_file`` shows ``step`` started (wait_for_step), and reap them; ranks still
    alive if anything fails are killed too, so no test leaves processes behind."""
    try:
        wait_for_step(keys_file, step, procs)
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("train_e2e"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sample_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step -> keys; a step replayed after a crash keeps its last occurrence."""
    out = {}
    for line in (run_dir / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["keys"]
    return out


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "open_clip_model.safetensors")


def assert_same_trajectory(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        for term in ("loss", "clip", "cyclip_in", "cyclip_cross", "logit_scale", "lr"):
            assert math.isclose(ra[term], rb[term], rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL), (ra["step"], term, ra[term], rb[term])


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max weight difference {worst} > {atol}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_on_two_ranks_and_loss_decreases(runs, stage):
    run_dir = {1: runs.zero1_2ranks_then_1rank, 2: runs.zero2_2ranks, 3: runs.zero3_2ranks_accum}[stage]()
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.05, (first, last)
    state = torch.load(run_dir / "checkpoints" / "step_00000012" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 12 and state["config"]["zero"]["stage"] == stage
    # every registered component is in the checkpoint, each under its name
    assert state["states"]["progress"]["step"] == 12 and state["states"]["data"]["next_step"] == 12
    assert state["states"]["progress"]["samples_seen"] == 12 * 16 and "objective" in state["states"]


def test_two_ranks_times_b_equal_one_rank_times_2b(runs):
    reference, two_ranks = runs.ref_1rank(), runs.zero2_2ranks()
    assert_same_trajectory(metrics(two_ranks), metrics(reference))
    assert_weights_close(exported(two_ranks), exported(reference), WEIGHT_ATOL)
    # the same samples: rank 0 then rank 1 of each step == the 1-rank batch
    one, r0, r1 = sample_keys(reference, 0), sample_keys(two_ranks, 0), sample_keys(two_ranks, 1)
    assert all(one[s] == r0[s] + r1[s] for s in range(12))


def test_feature_cached_accumulation_equals_the_large_batch(runs):
    accumulated, reference = runs.zero3_2ranks_accum(), runs.ref_1rank()
    assert_same_trajectory(metrics(accumulated), metrics(reference))
    assert_weights_close(exported(accumulated), exported(reference), WEIGHT_ATOL)


def test_elastic_resume_two_ranks_to_one_through_universal_checkpoint(runs):
    run_dir, reference = runs.zero1_2ranks_then_1rank(), runs.ref_1rank()
    # the 1-rank run loaded the converted checkpoint (pruned since, with the 2-rank original, by keep_last=2)
    assert f"resumed from {run_dir / 'checkpoints' / runs.preempted_at}_universal" in (runs.root / "elastic.rank0.log").read_text()
    assert (run_dir / "checkpoints" / "step_00000012").is_dir()
    # steps up to the preemption ran on 2 ranks, the rest on 1 rank: the trajectory of a 1-rank run throughout
    assert_same_trajectory(metrics(run_dir), metrics(reference))
    assert_weights_close(exported(run_dir), exported(reference), WEIGHT_ATOL)
    assert sample_keys(run_dir, 0)[11] == sample_keys(reference, 0)[11]


def test_kill9_of_a_rank_then_resume_latest_is_bit_exact(runs):
    reference = runs.zero2_2ranks()
    name = "killed"
    args = runs.base(name) + ["zero.stage=2", "run.resume=latest"]
    procs = runs.launch(2, args)
    try:  # kill rank 1 once it is into step 10 (last checkpoint: step 8)
        wait_for_step(runs.root / name / "sample_keys" / "rank1.jsonl", 9, procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        try:
            procs[0].wait(timeout=60)  # the survivor usually fails fast on its next collective
        except subprocess.TimeoutExpired:
            pass  # or waits in gloo; a launcher (torchrun, srun) would tear it down, as the finally does
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert (runs.root / name / "checkpoints" / "latest").read_text() == "step_00000008"
    assert runs.run(2, args) == [0, 0]
    for key, value in exported(reference).items():
        assert torch.equal(exported(runs.root / name)[key], value), key
    for rank in (0, 1):
        assert sample_keys(runs.root / name, rank) == sample_keys(reference, rank)
    assert [r["loss"] for r in metrics(runs.root / name)] == [r["loss"] for r in metrics(reference)]


def test_kill_during_checkpoint_save_leaves_previous_loadable(runs):
    reference = runs.ref_1rank()
    name = "killed_in_save"
    args = runs.base(name) + ["zero.stage=1", "run.resume=latest"]
    codes = runs.run(1, args, kill_during_save_at=8)  # tests/harness/rank_launcher.py: dies after writing its part
    assert codes == [-signal.SIGKILL]
    checkpoints = runs.root / name / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert (checkpoints / ".partial_step_00000008").is_dir() and not (checkpoints / "step_00000008").exists()
    assert runs.run(1, args) == [0]
    assert not list(checkpoints.glob(".partial_*"))
    assert "resumed from " + str(checkpoints / "step_00000004") in (runs.root / f"{name}.rank0.log").read_text()
    for key, value in exported(reference).items():
        assert torch.equal(exported(runs.root / name)[key], value), key


def test_finetune_from_export_on_a_corrupt_shard(runs, tmp_path):
    import open_clip

    from tests.harness.data_fixtures import readable_keys
    from train.config import DataConfig
    from train.data.loader import build_loader
    from train.core.export import export_checkpoint
    pretrained = runs.ref_1rank()
    # the live export equals the export rebuilt offline from the sharded checkpoint (python -m train.export)
    offline = export_checkpoint(pretrained / "checkpoints" / "step_00000012", tmp_path / "offline" / "export")
    offline_sd = exported(offline.parent)
    assert_weights_close(offline_sd, exported(pretrained), 0.0)
    via_latest = export_checkpoint(pretrained / "checkpoints" / "latest", tmp_path / "via_latest" / "export")
    assert_weights_close(exported(via_latest.parent), offline_sd, 0.0)    # `latest` names that same checkpoint
    assert (offline / "open_clip_config.json").read_text() == (pretrained / "export" / "open_clip_config.json").read_text()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{offline}")    # open_clip's hub layout
    assert torch.equal(model.visual.conv1.weight, offline_sd["visual.conv1.weight"])
    # corrupt data: one undecodable JPEG in shard 0, shard 1 truncated to a third
    bad = corrupt_copy(runs.data, tmp_path / "bad")
    name = "finetune"
    args = ["--config", str(ROOT / "configs" / "finetune_m2mix.yaml"), f"data.path={bad}",
            f"run.run_dir={runs.root / name}", f"model.pretrained={pretrained / 'export'}",
            "data.global_batch_size=16", "optim.steps=6", "optim.warmup_steps=1", "checkpoint.every_steps=100",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.eval_every_steps=3",
            "logging.eval_max_samples=16"]
    assert runs.run(1, args) == [0]
    records = metrics(runs.root / name)
    assert len(records) == 6 and "m2mix" in records[0] and "cyclip_in" not in records[0]
    # Every damaged sample the 6 steps drew is counted once: the reference is the undamaged copy's sample
    # order for those steps against the keys that plain tarfile + PIL can read in the damaged copy.
    drawn = [key for batch in build_loader(DataConfig(path=str(runs.data), global_batch_size=16, num_workers=0),
                                           0, 1, 0, 0, 6, lambda image: torch.zeros(1), lambda texts: torch.zeros(1, 1))
             for key in batch["keys"]]
    readable = readable_keys(bad)
    expected_skips = sum(key not in readable for key in drawn)
    assert expected_skips > 0 and [r["skipped_samples"] for r in records][-1] == expected_skips
    assert any(key.startswith("eval/") for key in records[2]) and not any(k.startswith("eval/") for k in records[0])
    # the first step's logit scale is the pretrained one, not the 1/0.07 of a fresh model
    assert math.isclose(records[0]["logit_scale"], offline_sd["logit_scale"].exp().item(), rel_tol=1e-6)


def test_nan_losses_are_skipped_then_abort_with_a_clear_message(runs):
    """lr = 1e30 blows the weights up at the first update, so every later loss is NaN/inf: each such
    step is skipped and counted, and max_nonfinite_steps of them in a row abort the run, saying why."""
    name = "nan"
    codes = runs.run(1, runs.base(name) + ["optim.lr=1e30", "optim.warmup_steps=0", "optim.max_nonfinite_steps=3",
                                           "checkpoint.every_steps=100"])
    log = (runs.root / f"{name}.rank0.log").read_text()
    assert codes[0] != 0, log[-2000:]
    assert "3 consecutive steps had a NaN/inf loss (last at step 4)" in log, log[-2000:]
    assert log.count("non-finite loss, step skipped") == 3
    first = metrics(runs.root / name)[0]
    assert first["step"] == 1 and math.isfinite(first["loss"])  # the one step before the blow-up was logged


def test_zero_stage0_on_two_ranks_equals_one_rank(runs):
    """Stage 0 (plain data parallel inside DeepSpeed) takes its own gradient-averaging path."""
    zero0, reference = runs.get("zero0_2ranks", 2, ["zero.stage=0"]), runs.ref_1rank()
    assert_same_trajectory(metrics(zero0), metrics(reference))
    assert_weights_close(exported(zero0), exported(reference), WEIGHT_ATOL)


def test_kill9_then_resume_on_another_world_size_and_worker_count_continues_the_order(runs):
    """The loader's guarantee end to end (train/data/loader.py): 2 ranks x 2 workers are killed -9 mid-run, 1 rank
    with 0 workers resumes from the last checkpoint, and every step trains on the 1-rank run's samples."""
    reference, name = runs.ref_1rank(), "killed_elastic"
    args = runs.base(name) + ["zero.stage=0", "run.resume=latest"]
    kill9_at_step(runs.launch(2, args + ["data.num_workers=2"]), runs.root / name / "sample_keys" / "rank0.jsonl", 6)
    run_dir = runs.root / name
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert runs.run(1, args + ["data.num_workers=0"]) == [0], f"see {runs.root}/{name}.rank0.log"
    one, r0, r1 = sample_keys(reference, 0), sample_keys(run_dir, 0), sample_keys(run_dir, 1)
    assert all((r0[s] if s >= 4 else r0[s] + r1[s]) == one[s] for s in range(12))
    assert_same_trajectory(metrics(run_dir), metrics(reference))


def test_elastic_resume_of_a_stage0_checkpoint_two_ranks_to_one(runs):
    """Stage 0 keeps the optimizer state whole, so it resumes on another world size without conversion."""
    source, reference = runs.get("zero0_2ranks", 2, ["zero.stage=0"]), runs.ref_1rank()
    run_dir = runs.root / "zero0_elastic"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    (run_dir / "checkpoints" / "latest").write_text("step_00000008")
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in metrics(run_dir) if r["step"] <= 8))
    codes = runs.run(1, runs.base("zero0_elastic") + ["zero.stage=0", "run.resume=latest"])
    assert codes == [0], f"see {runs.root}/zero0_elastic.rank0.log"
    assert "resumed from" in (runs.root / "zero0_elastic.rank0.log").read_text()
    assert not list((run_dir / "checkpoints").glob("*_universal"))
    assert_same_trajectory(metrics(run_dir), metrics(reference))
    assert_weights_close(exported(run_dir), exported(reference), WEIGHT_ATOL)


def test_logit_scale_above_the_cap_is_clamped_to_it_and_gets_no_gradient(runs):
    """A fresh model starts at exp(logit_scale) = 1/0.07 = 14.29; with optim.max_logit_scale=10 below that,
    CLIP's clamp must give exactly 10 at every step, and the clamp passes no gradient, so the parameter
    (no weight decay on it) must still hold its initial value log(1/0.07) in the last checkpoint."""
    name = "clamped"
    codes = runs.run(1, runs.base(name) + ["optim.steps=3", "optim.max_logit_scale=10", "checkpoint.every_steps=100",
                                           "checkpoint.export=false"])
    assert codes == [0], f"see {runs.root}/{name}.rank0.log"
    assert [r["logit_scale"] for r in metrics(runs.root / name)] == [10.0, 10.0, 10.0]
    module = torch.load(runs.root / name / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert module["logit_scale"].item() == torch.tensor(math.log(1 / 0.07)).item()
