"""A user mistake in `python -m train` ends in one line on stderr and exit code 2, never a traceback.

Real processes: `python -m train` (one process), and a real 2-rank torchrun (gloo) where only rank 0
speaks. Each mistake is found by train/preflight.py before the model or DeepSpeed start, so every case
costs one interpreter start (~2 s). The expected message names the key to fix (the reference here is the
key and value the test itself put wrong), and nothing else may be printed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_fixtures import make_digits_dataset
from tests.rank_launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "configs" / "pretrain_cyclip.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    # 128 train samples in 4 shards: auto partitions = 4 for a global batch of 16
    return make_digits_dataset(tmp_path_factory.mktemp("user_errors") / "digits", n_train=128, n_val=16,
                               shard_size=32)


def train_once(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(clean, PYTHONPATH=str(ROOT), **(env or {})))


def assert_one_line(done: subprocess.CompletedProcess, *must_contain: str) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("config error: "), lines[0]
    for text in must_contain:
        assert text in lines[0], lines[0]
    assert done.returncode == 2, (done.returncode, lines[0])


def base(digits: Path, run_dir: Path) -> list[str]:
    return ["--config", PRETRAIN, f"data.path={digits}", f"run.run_dir={run_dir}", "data.global_batch_size=16"]


CASES = {
    # name: (args after base, the text the one line must contain)
    "bad key": (["optim.stepz=3"], ["optim.stepz"]),
    "wrong type": (["optim.steps=many"], ["optim.steps", "many"]),
    "invalid value": (["zero.stage=7"], ["zero.stage", "7"]),
    "missing dataset folder": (["data.path={tmp}/no_such_dataset"], ["data.path={tmp}/no_such_dataset",
                                                                       "does not exist", "make shards"]),
    "folder without manifest": (["data.path={tmp}"], ["data.path={tmp}", "no manifest.json", "make shards"]),
    "missing split": (["data.split=training"], ["data.split=training", "has: train, val"]),
    "missing eval split": (["logging.eval_every_steps=2", "logging.eval_split=test"], ["logging.eval_split=test"]),
    "global batch larger than the split": (["data.global_batch_size=256"], ["128 samples", "256"]),
    "partitions not dividing the batch": (["data.partitions=3"], ["data.partitions=3", "data.global_batch_size=16"]),
    "missing resume checkpoint": (["run.resume={tmp}/runs/x/checkpoints/step_00000004"],
                                  ["run.resume={tmp}/runs/x/checkpoints/step_00000004", "no such checkpoint"]),
    "resume folder that is not a checkpoint": (["run.resume={tmp}"], ["run.resume={tmp}", "not a complete checkpoint"]),
    "missing pretrained export": (["model.pretrained={tmp}/runs/pre/export/model.pt"],
                                  ["model.pretrained={tmp}/runs/pre/export/model.pt", "python -m train.export"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(digits, tmp_path, case):
    extra, expected = CASES[case]
    fill = lambda items: [item.replace("{tmp}", str(tmp_path)) for item in items]  # noqa: E731
    done = train_once(base(digits, tmp_path / "run") + fill(extra), cwd=tmp_path)
    assert_one_line(done, *fill(expected))
    assert not (tmp_path / "run").exists()  # nothing started: no run folder was made


def test_missing_config_file(tmp_path):
    done = train_once(["--config", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    assert_one_line(done, f"config file not found: {tmp_path / 'nope.yaml'}")


def test_default_data_path_on_a_fresh_clone_names_make_shards(tmp_path):
    """The shipped config from a folder without data/fmnist (a fresh clone's state)."""
    done = train_once(["--config", PRETRAIN], cwd=tmp_path)
    assert_one_line(done, "data.path=data/fmnist does not exist", "make shards")


def test_dry_run_checks_for_the_given_world_size(digits, tmp_path):
    """--dry-run (what `make pretrain` runs first): OK for 4 ranks (P = 4 streams); 8 ranks cannot share 4."""
    ok = train_once(base(digits, tmp_path / "run") + ["--dry-run", "--world-size", "4"], cwd=tmp_path)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr[-3000:]
    bad = train_once(base(digits, tmp_path / "run") + ["--dry-run", "--world-size", "8"], cwd=tmp_path)
    assert_one_line(bad, "8 ranks cannot share data.partitions=4 streams")


def test_make_pretrain_without_shards_says_which_command_to_run(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "pretrain",
                           f"ARGS=data.path={tmp_path}/fmnist run.run_dir={tmp_path}/run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr + done.stdout and "torchrun" not in done.stdout, done.stdout[-2000:]
    # make's own "make[N]: *** ... Error 2" line aside (N > 0 under `make test`)
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert lines == [f"config error: data.path={tmp_path}/fmnist does not exist: build it with `make shards` "
                     "(python -m pipeline demo --out DIR, or python -m pipeline run)"], done.stderr
    assert done.returncode != 0


def test_two_rank_torchrun_prints_the_error_once_from_rank_0(digits, tmp_path):
    """data.partitions=1 cannot be shared by 2 ranks. torchrun keeps each rank's output in its log dir:
    rank 0's stderr is the one line, rank 1's is empty, no rank shows a traceback, and no rank started
    the trainer (torchrun then adds its own failure report; that part is torchrun's)."""
    logs = tmp_path / "logs"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--log-dir", str(logs),
           "--redirects", "3", "-m", "train", *base(digits, tmp_path / "run"), "data.partitions=1"]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(clean, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    stdout = "".join(p.read_text() for p in logs.rglob("stdout.log"))
    assert sorted(stderr) == [0, 1], done.stderr[-3000:]
    assert "Traceback" not in "".join(stderr.values()) + stdout, stderr
    assert stderr[1].strip() == ""
    lines = [line for line in stderr[0].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ") and "2 ranks cannot share" in lines[0] \
        and "data.partitions=1" in lines[0], stderr[0]
    assert "exitcode  : 2" in done.stderr  # torchrun's report: every rank exited with the user-error code
    assert not (tmp_path / "run").exists()
