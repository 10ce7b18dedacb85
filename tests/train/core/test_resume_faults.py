"""Resume faults (issue 23, rows 6, 7 and 10): ``checkpoints/latest`` that names a checkpoint that is gone; a
dataset moved or spelled otherwise; the same command started twice on one run folder.

Reported: with ``run.resume=latest`` the run silently started over at step 0 and wrote over the complete
checkpoint it had. Now the newest complete checkpoint is resumed (one warning), or, with none left, the run
is refused in one line. References: checkpoint folders laid out by hand, and a real run's own checkpoints.
"""
from __future__ import annotations

import os
import shutil
import signal
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


def train(data: Path, run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """``python -m train`` on one rank: tiny config, a checkpoint every 2 steps."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "train", *ARGS, f"data.path={data}", f"run.run_dir={run}",
                           f"data.cache_dir={run.parent / 'cache'}", f"optim.steps={steps}", *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


ARGS = ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), "data.global_batch_size=8",
        "data.num_workers=0", "optim.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
        "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder) of a 4-step run: checkpoints step_2 and step_4."""
    root = tmp_path_factory.mktemp("first_run")
    data = make_digits_dataset(root / "ds", n_train=64, n_val=16, shard_size=16)
    done = train(data, root / "run", 4)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, root / "run"


def test_a_run_whose_newest_checkpoint_was_deleted_resumes_from_the_one_before(first_run, tmp_path):
    data, run = first_run[0], tmp_path / "run"
    shutil.copytree(first_run[1], run)
    checkpoints = run / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == step_tag(4)
    saved = (checkpoints / step_tag(2) / TRAINER_STATE).read_bytes()
    shutil.rmtree(checkpoints / step_tag(4))
    done = train(data, run, 6, "run.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the newest complete checkpoint, step_00000002" in done.stderr
    assert f"resumed from {checkpoints / step_tag(2)} at step 2" in done.stderr
    assert (checkpoints / step_tag(2) / TRAINER_STATE).read_bytes() == saved  # never written over
    assert (checkpoints / LATEST).read_text().strip() == step_tag(6)
    assert CheckpointManager.load_trainer_state(checkpoints / step_tag(6))["step"] == 6


def test_the_same_data_resumes_whatever_its_path_and_other_data_is_refused(first_run, tmp_path, monkeypatch):
    """Row 7: the run folder copied, the dataset copied elsewhere or written relative: the preflight compares
    the data's identity (shard names, counts, checksums: the order's fingerprint), not the path string."""
    from common.config_loader import ConfigError, load_config
    from common.shard_folder import read_manifest, write_manifest
    from train.config import TrainConfig
    from train.core.preflight import preflight

    data, run = first_run
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(data, tmp_path / "elsewhere" / "ds")

    def check(path) -> None:
        cfg = load_config(TrainConfig, ARGS[1], [a for a in ARGS[2:]] + [
            f"data.path={path}", f"run.run_dir={tmp_path / 'run'}", "run.resume=latest", "optim.steps=6"])
        preflight(cfg, 1)

    check(tmp_path / "elsewhere" / "ds")  # copied: the same data
    monkeypatch.chdir(data.parent)
    check("ds")  # written relative
    check(f"./../{data.parent.name}/ds")  # ... and otherwise
    other = tmp_path / "other"  # the same sizes, but shards in another order: other data
    shutil.copytree(data, other)
    manifest = read_manifest(other)
    manifest.splits["train"].shards.reverse()
    write_manifest(other, manifest)
    with pytest.raises(ConfigError) as err:
        check(other)
    assert "\n" not in str(err.value) and "holds other data" in str(err.value) and "shards_sha1" in str(err.value)
    fewer = tmp_path / "fewer"
    shutil.copytree(data, fewer)
    manifest = read_manifest(fewer)
    manifest.splits["train"].shards.pop()
    write_manifest(fewer, manifest)
    with pytest.raises(ConfigError, match="holds other data"):
        check(fewer)


def test_a_second_training_on_a_busy_run_folder_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    """Row 10: the same command started twice on one run folder. The second is refused in one line naming the
    first (also when the folder is spelled through a symlink); once the first is killed (-9), the folder is free
    at once, though its DataLoader worker (a forked child) may still be alive (a flock would stay held by it)."""
    from tests.harness.rank_launcher import launch_ranks
    from tests.train.core.test_train_deepspeed import wait_for_step
    from train.core.run_lock import hold_run_lock, release_run_lock

    data = make_digits_dataset(tmp_path / "ds", n_train=64, n_val=16, shard_size=16)
    args = ["--config", str(REPO_ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={data}",
            f"run.run_dir={tmp_path / 'run'}", "data.global_batch_size=8", "data.num_workers=1",
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
        dry = subprocess.run([sys.executable, "-m", "train", "--dry-run", *args], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert dry.returncode == 2 and f"is in use by pid {first.pid} on" in dry.stderr, dry.stderr[-2000:]
        (tmp_path / "alias").symlink_to(tmp_path / "run")
        with pytest.raises(InputError, match=f"in use by pid {first.pid}"):
            hold_run_lock(tmp_path / "alias")
    finally:
        first.kill()
        first.wait(timeout=60)
    hold_run_lock(tmp_path / "alias")  # the dead run's lock is gone with it
    release_run_lock(tmp_path / "alias")


def test_a_forked_child_that_outlives_the_holder_does_not_keep_the_run_folder_locked(tmp_path):
    """Row 10, own input: the holder forks (as DataLoader workers are forked) and is killed -9; its child lives on.
    The folder must be free while the child still runs."""
    from train.core.run_lock import hold_run_lock, release_run_lock
    script = ("import os, signal, sys, time\n"
              "from train.core.run_lock import hold_run_lock\n"
              f"hold_run_lock({str(tmp_path / 'run')!r})\n"
              "child = os.fork()\n"
              "if child == 0:  # let go of the pipes, or the run below waits for the child\n"
              "    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
              "    time.sleep(60); os._exit(0)\n"
              "print(child, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    holder = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert holder.returncode == -signal.SIGKILL, holder.stderr[-2000:]
    child = int(holder.stdout.split()[0])
    try:
        os.kill(child, 0)  # the orphan is alive: the check below is the one that matters
        hold_run_lock(tmp_path / "run")
        release_run_lock(tmp_path / "run")
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("size_mb,saved", [(60, 2), (12, None)])  # full at the second save; at the first
def test_a_full_disk_during_a_save_is_one_line_and_latest_stays(first_run, tmp_path, size_mb, saved):
    """Row 8 on a real small filesystem (tmpfs; a checkpoint of the tiny model takes about 40 MiB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")  # not a mock: without one the fault cannot be made here
    try:
        done = train(first_run[0], mount / "run", 4)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert lines[-1].startswith("error: no space left in ") and str(mount / "run" / "checkpoints") in lines[-1]
        latest = mount / "run" / "checkpoints" / LATEST
        if saved is None:
            assert "no checkpoint was saved yet" in lines[-1] and not latest.exists()
        else:
            assert f"{LATEST} still names {step_tag(saved)}" in lines[-1]
            assert latest.read_text().strip() == step_tag(saved)
            assert CheckpointManager.load_trainer_state(latest.parent / step_tag(saved))["step"] == saved
        assert not list((mount / "run" / "checkpoints").glob(".partial_*"))  # the half-written save is gone
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_zero_stage_change_on_resume_is_one_line_unless_between_1_and_2(first_run, tmp_path):
    """Row 9: ZeRO-1 <-> 2 share their checkpoint layout and resume (preflight passes, and the trainer resumed
    1 -> 2 when tried); 0 <-> any and 3 <-> any are refused in one line before DeepSpeed's assertion."""
    from common.config_loader import ConfigError, load_config
    from train.config import TrainConfig
    from train.core.preflight import preflight

    data, run = first_run
    was = CheckpointManager.load_trainer_state(run / "checkpoints" / step_tag(4))["config"]["zero"]["stage"]

    def check(stage: int) -> None:
        cfg = load_config(TrainConfig, ARGS[1], ARGS[2:] + [f"data.path={data}", f"run.run_dir={run}",
                                                            "run.resume=latest", "optim.steps=6", f"zero.stage={stage}"])
        preflight(cfg, 1)

    for stage in range(4):
        if stage == was or {stage, was} == {1, 2}:
            check(stage)
        else:
            with pytest.raises(ConfigError) as err:
                check(stage)
            assert "\n" not in str(err.value) and f"zero.stage={was}" in str(err.value), stage
