"""Resume faults (issue 23, rows 6 and 10): ``checkpoints/latest`` that names a checkpoint that is gone; the
same command started twice on one run folder.

Reported: with ``run.resume=latest`` the run silently started over at step 0 and wrote over the complete
checkpoint it had. Now the newest complete checkpoint is resumed (one warning), or, with none left, the run
is refused in one line. References: checkpoint folders laid out by hand, and a real run's own checkpoints.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import InputError
from common.paths import REPO_ROOT
from tests.harness.data_fixtures import make_digits_dataset
from train.core.checkpoint import LATEST, TRAINER_STATE, CheckpointManager, latest_checkpoint, step_tag


def layout(root: Path, complete=(), incomplete=(), pointer=None) -> Path:
    """RUN_DIR/checkpoints with complete step folders (a trainer state inside), incomplete ones (without), and
    ``latest`` holding ``pointer`` (None: no pointer file)."""
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    for step in complete:
        (folder / step_tag(step)).mkdir()
        (folder / step_tag(step) / TRAINER_STATE).write_bytes(b"x")
    for step in incomplete:
        (folder / step_tag(step)).mkdir()
    (folder / f"{step_tag(max(complete, default=0))}_universal").mkdir()  # never a resume point of its own
    if pointer is not None:
        (folder / LATEST).write_text(pointer)
    return root


@pytest.mark.parametrize("pointer,incomplete", [
    (step_tag(4), ()),           # the row: latest names a deleted folder
    (step_tag(4), (4,)),         # ... or one that lost its files
    ("", ()),                    # an empty pointer
    ("\x00\x13garbage\n", ()),   # a damaged one
    (None, (4,)),                # no pointer at all, an incomplete newer folder beside the complete ones
])
def test_a_pointer_to_nothing_resumes_the_newest_complete_checkpoint(tmp_path, caplog, pointer, incomplete):
    run = layout(tmp_path / "run", complete=(1, 2), incomplete=incomplete, pointer=pointer)
    with caplog.at_level("WARNING", logger="train"):
        assert latest_checkpoint(run) == run / "checkpoints" / step_tag(2)
    assert any("resuming from the newest complete checkpoint, step_00000002" in r.getMessage() for r in caplog.records)


def test_a_pointer_to_nothing_with_no_complete_checkpoint_is_refused_in_one_line(tmp_path):
    run = layout(tmp_path / "run", incomplete=(3,), pointer=step_tag(3))
    with pytest.raises(InputError) as err:
        latest_checkpoint(run)
    assert "\n" not in str(err.value) and "step_00000003" in str(err.value) and "run.resume=none" in str(err.value)
    # and where nothing was ever checkpointed (killed during the first save): a fresh start, as before
    assert latest_checkpoint(layout(tmp_path / "fresh", incomplete=(1,))) is None


def test_a_run_whose_newest_checkpoint_was_deleted_resumes_from_the_one_before(tmp_path):
    data = make_digits_dataset(tmp_path / "ds", n_train=64, n_val=16, shard_size=16)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")

    def train(steps: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "train", "--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"),
                               f"data.path={data}", f"run.run_dir={run}", "data.global_batch_size=8",
                               "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", f"optim.steps={steps}",
                               "optim.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
                               "logging.progress_bar=false", "logging.tensorboard=false", *extra],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    done = train(4)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = run / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == step_tag(4)
    saved = (checkpoints / step_tag(2) / TRAINER_STATE).read_bytes()
    shutil.rmtree(checkpoints / step_tag(4))
    done = train(6, "run.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the newest complete checkpoint, step_00000002" in done.stderr
    assert f"resumed from {checkpoints / step_tag(2)} at step 2" in done.stderr
    assert (checkpoints / step_tag(2) / TRAINER_STATE).read_bytes() == saved  # never written over
    assert (checkpoints / LATEST).read_text().strip() == step_tag(6)
    assert CheckpointManager.load_trainer_state(checkpoints / step_tag(6))["step"] == 6


def test_a_second_training_on_a_busy_run_folder_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    """Row 10: the same command started twice on one run folder. The second is refused in one line naming the
    first (also when the folder is spelled through a symlink); once the first is killed (-9), the folder is free."""
    from tests.harness.rank_launcher import launch_ranks
    from tests.train.core.test_train_deepspeed import wait_for_step
    from train.core.run_lock import hold_run_lock, release_run_lock

    data = make_digits_dataset(tmp_path / "ds", n_train=64, n_val=16, shard_size=16)
    args = ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={data}",
            f"run.run_dir={tmp_path / 'run'}", "data.global_batch_size=8", "data.num_workers=0",
            "optim.steps=100000", "checkpoint.every_steps=100000", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.log_sample_keys=true"]
    (first,) = launch_ranks(tmp_path, "run", 1, args)
    try:
        wait_for_step(tmp_path / "run" / "sample_keys" / "rank0.jsonl", 1, [first])
        second = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert f"is in use by pid {first.pid} on" in lines[0], lines
        (tmp_path / "alias").symlink_to(tmp_path / "run")
        with pytest.raises(InputError, match=f"in use by pid {first.pid}"):
            hold_run_lock(tmp_path / "alias")
    finally:
        first.kill()
        first.wait(timeout=60)
    hold_run_lock(tmp_path / "alias")  # the dead run's lock is gone with it
    release_run_lock(tmp_path / "alias")
