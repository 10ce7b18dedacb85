"""A user mistake in `python -m train` ends in one line on stderr and exit code 2, never a traceback.

Real processes: `python -m train` (one process), and a real 2-rank torchrun (gloo) where only rank 0
speaks. Each mistake is found by train/core/preflight.py before the model or DeepSpeed start, so every case
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

from tests.harness.data_fixtures import make_digits_dataset
from tests.harness.rank_launcher import free_port
from common.paths import REPO_ROOT

ROOT = REPO_ROOT
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


def assert_one_line(done: subprocess.CompletedProcess, *must_contain: str, label: str = "config error") -> None:
    """One stderr line ``{label}: ...`` (common/cli.py): "config error" for a value, "error" for a path."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"{label}: "), lines[0]
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
    "partitions not dividing the batch": (["data.streams=3"], ["data.streams=3", "data.global_batch_size=16"]),
    "missing resume checkpoint": (["run.resume={tmp}/runs/x/checkpoints/step_00000004"],
                                  ["run.resume={tmp}/runs/x/checkpoints/step_00000004", "no such checkpoint"]),
    "resume folder that is not a checkpoint": (["run.resume={tmp}"], ["run.resume={tmp}", "not a complete checkpoint"]),
    "missing pretrained export": (["model.pretrained={tmp}/runs/pre/export/model.pt"],
                                  ["model.pretrained={tmp}/runs/pre/export/model.pt", "python -m train.export"]),
    "missing pretrained export folder": (["model.pretrained={tmp}/runs/pre/export"],
                                         ["model.pretrained={tmp}/runs/pre/export", "python -m train.export"]),
    # values that passed the preflight and crashed later (fresh-user report, item 3)
    "unknown model name": (["model.name=ViT-Nope"], ["model.name=ViT-Nope", "not an open_clip model"]),
    "pretrained file that is not weights": ([f"model.pretrained={ROOT / 'README.md'}"],
                                            [f"model.pretrained={ROOT / 'README.md'}", "not a weights file"]),
    "pretrained tag unknown for the model": (["model.pretrained=laion2b_s34b_b79k"],
                                             ["model.pretrained=laion2b_s34b_b79k", "tiny_vit"]),
    "run dir that is a file": ([f"run.run_dir={ROOT / 'README.md'}"], ["run.run_dir=", "is a file"]),
    "run dir below a file": ([f"run.run_dir={ROOT / 'README.md'}/run"], ["run.run_dir=", "is a file"]),
    "resume value none is fresh, lr not": (["run.resume=none", "optim.lr=-1"], ["optim.lr must be > 0, got -1.0"]),
    # mixtures (data.sources): the source at fault is named by its index
    "missing mixture source": (["data.sources=[{path: {data}, weight: 3}, {path: {tmp}/nope, weight: 1}]"],
                               ["data.sources[1].path={tmp}/nope", "does not exist"]),
    "missing split of a source": (["data.sources=[{path: {data}}, {path: {data}, name: b, split: test}]"],
                                  ["data.sources[1].split=test", "has: train, val"]),
    "source without a sample of a stream": (["data.streams=8", "data.sources=[{path: {data}, weight: 1}, "
                                             "{path: {data}, name: rare, weight: 0.01}]"],
                                            ["data source rare", "gets none of the 2 samples"]),
    "source weight zero": (["data.sources=[{path: {data}, weight: 0}]"], ["data.sources[0].weight must be > 0"]),
}
# A path the user gave that cannot be used is an InputError ("error: ..."), not a config error.
PATH_CASES = {"missing dataset folder", "folder without manifest", "missing mixture source", "missing resume checkpoint",
              "resume folder that is not a checkpoint", "missing pretrained export", "missing pretrained export folder",
              "pretrained file that is not weights", "run dir that is a file", "run dir below a file"}
# Every numeric bound of train/config.py: (key=value, the message). The reference is the bound the test states.
BOUNDS = [
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1, got 0"),
    ("logging.every_steps=0", "logging.every_steps must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.steps=-5", "optim.steps must be >= 1, got -5"),
    ("data.accum_freq=0", "data.accum_freq must be >= 1, got 0"),
    ("data.shuffle_window=0", "data.shuffle_window must be >= 1, got 0"),
    ("data.streams=-2", "data.streams must be >= 0, got -2"),
    ("data.cache_limit_gb=0", "data.cache_limit_gb must be > 0, got 0.0"),
    ("data.retries=-1", "data.retries must be >= 0, got -1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
    ("optim.min_lr=1", "optim.min_lr=1.0 must be <= optim.lr="),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.beta1=1", "optim.beta1 must be >= 0 and < 1, got 1.0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("optim.max_nonfinite_steps=0", "optim.max_nonfinite_steps must be >= 1, got 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0, got -1"),
    ("logging.eval_every_steps=-1", "logging.eval_every_steps must be >= 0, got -1"),
    ("run.stop_after_steps=-1", "run.stop_after_steps must be >= 0, got -1"),
    ("model.force_image_size=0", "model.force_image_size must be >= 1, got 0"),
    ("model.aug_scale_min=0", "model.aug_scale_min must be > 0 and <= 1, got 0.0"),
    ("zero.reduce_bucket_size=0", "zero.reduce_bucket_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_out_of_range_value_is_one_line_in_the_dry_run(digits, tmp_path, override, message):
    done = train_once(["--dry-run"] + base(digits, tmp_path / "run") + [override], cwd=tmp_path)
    assert_one_line(done, message)


def test_world_size_zero_is_refused(digits, tmp_path):
    done = train_once(["--dry-run", "--world-size", "0"] + base(digits, tmp_path / "run"), cwd=tmp_path)
    assert_one_line(done, "world size must be >= 1, got 0")


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(digits, tmp_path, case):
    extra, expected = CASES[case]
    fill = lambda items: [item.replace("{tmp}", str(tmp_path)).replace("{data}", str(digits))  # noqa: E731
                          for item in items]
    done = train_once(base(digits, tmp_path / "run") + fill(extra), cwd=tmp_path)
    assert_one_line(done, *fill(expected), label="error" if case in PATH_CASES else "config error")
    assert not (tmp_path / "run").exists()  # nothing started: no run folder was made


def test_missing_config_file(tmp_path):
    done = train_once(["--config", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    assert_one_line(done, f"config file not found: {tmp_path / 'nope.yaml'}")


def test_default_data_path_on_a_fresh_clone_names_make_shards(tmp_path):
    """The shipped config from a folder without data/fmnist (a fresh clone's state)."""
    done = train_once(["--config", PRETRAIN], cwd=tmp_path)
    assert_one_line(done, "data.path=data/fmnist does not exist", "make shards", label="error")


def test_dry_run_checks_for_the_given_world_size(digits, tmp_path):
    """--dry-run (what `make pretrain` runs first): OK for 4 ranks (P = 4 streams); 8 ranks cannot share 4."""
    ok = train_once(base(digits, tmp_path / "run") + ["--dry-run", "--world-size", "4"], cwd=tmp_path)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr[-3000:]
    assert "dry run: config, data, model and launcher checks passed for 4 rank(s)" in ok.stderr, ok.stderr[-3000:]
    bad = train_once(base(digits, tmp_path / "run") + ["--dry-run", "--world-size", "8"], cwd=tmp_path)
    assert_one_line(bad, "8 ranks cannot share data.streams=4 streams")


def test_make_pretrain_without_shards_says_which_command_to_run(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "pretrain",
                           f"ARGS=data.path={tmp_path}/fmnist run.run_dir={tmp_path}/run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr + done.stdout and "torchrun" not in done.stdout, done.stdout[-2000:]
    # make's own "make[N]: *** ... Error 2" line aside (N > 0 under `make test`)
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert lines == [f"error: data.path={tmp_path}/fmnist does not exist: build it with `make shards` "
                     "(python -m pipeline demo --out DIR, or python -m pipeline run), or index shards you already "
                     "have with python -m pipeline index --shards SPEC --out DIR"], done.stderr
    assert done.returncode != 0


def test_two_rank_torchrun_prints_the_error_once_from_rank_0(digits, tmp_path):
    """data.streams=1 cannot be shared by 2 ranks. torchrun keeps each rank's output in its log dir:
    rank 0's stderr is the one line, rank 1's is empty, no rank shows a traceback, and no rank started
    the trainer (torchrun then adds its own failure report; that part is torchrun's)."""
    logs = tmp_path / "logs"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--log-dir", str(logs),
           "--redirects", "3", "-m", "train", *base(digits, tmp_path / "run"), "data.streams=1"]
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
        and "data.streams=1" in lines[0], stderr[0]
    assert "exitcode  : 2" in done.stderr  # torchrun's report: every rank exited with the user-error code
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- resuming this run with other settings
@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory) -> Path:
    """A real 2-step run (1 process, DeepSpeed) with run.resume=latest, as the shipped configs set it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = train_once(base(digits, run_dir) + ["optim.steps=2", "checkpoint.every_steps=2", "data.num_workers=0",
                                               "logging.progress_bar=false", "logging.tensorboard=false"],
                      cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    return run_dir


def rerun(digits, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return train_once(base(digits, run_dir) + ["optim.steps=2", "data.num_workers=0", *extra], cwd=run_dir.parent)


def saved_config(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)["config"]


CHANGED = {
    # overrides: the "key: old -> new" texts the one line must hold (old values read from the checkpoint)
    "CyCLIP lambdas off": (["loss.cyclip_in_modal=0", "loss.cyclip_cross_modal=0"],
                           [("loss", "cyclip_in_modal", "0.0"), ("loss", "cyclip_cross_modal", "0.0")]),
    "lr and seed": (["optim.lr=0.1", "run.seed=7"], [("optim", "lr", "0.1"), ("run", "seed", "7")]),
    "global batch": (["data.global_batch_size=32"], [("data", "global_batch_size", "32")]),
    "precision": (["zero.precision=bf16"], [("zero", "precision", "bf16")]),
    "patch dropout and a LiT lock": (["model.patch_dropout=0.5", "model.lock_text=true"],
                                     [("model", "patch_dropout", "0.5"), ("model", "lock_text", "True")]),
}


@pytest.mark.parametrize("case", sorted(CHANGED))
def test_resume_latest_with_changed_run_settings_is_refused(digits, finished_run, case):
    overrides, changes = CHANGED[case]
    before = (finished_run / "config.yaml").read_text()
    done = rerun(digits, finished_run, *overrides)
    old = saved_config(finished_run)
    expected = [f"{section}.{key}: {old[section][key]} -> {new}" for section, key, new in changes]
    assert_one_line(done, "run.resume=latest", *expected, "use a new run.run_dir", "run.resume=none")
    assert (finished_run / "config.yaml").read_text() == before  # the run's label is not rewritten


@pytest.mark.parametrize("extra", [[], ["optim.steps=5", "--dry-run"], ["data.num_workers=1", "logging.every_steps=3",
                                   "checkpoint.every_steps=7", "zero.stage=2", "optim.max_nonfinite_steps=9",
                                   "model.grad_checkpointing=true", "run.compile=true"]],
                         ids=["same settings", "extending optim.steps", "free knobs"])
def test_resume_latest_accepts_same_or_free_settings(digits, finished_run, extra):
    """A finished run says so in one line and trains nothing (no DeepSpeed start); knobs that do not
    define the run, and a longer optim.steps (dry run: it would train), are accepted."""
    done = rerun(digits, finished_run, *extra)
    assert done.returncode == 0 and "config error" not in done.stderr, done.stderr[-3000:]
    if "--dry-run" not in extra:
        assert f"run already finished at step 2 (optim.steps=2) in {finished_run}" in done.stderr, done.stderr
        assert "deepspeed" not in done.stderr.lower(), done.stderr[-3000:]


@pytest.mark.parametrize("resume", ["none", "checkpoint"])
def test_fresh_start_or_explicit_checkpoint_is_not_compared(digits, finished_run, resume):
    """run.resume=none starts over (nothing to compare) and run.resume=PATH fine-tunes from a checkpoint on
    purpose: neither is refused for a changed loss (checked with --dry-run, which changes nothing)."""
    value = "none" if resume == "none" else finished_run / "checkpoints" / "step_00000002"
    done = rerun(digits, finished_run, "--dry-run", f"run.resume={value}", "loss.cyclip_in_modal=0")
    lines = done.stderr.strip().splitlines()  # nothing but the dry run's verdict: no warning, no refusal
    assert done.returncode == 0 and len(lines) == 1 and "dry run: config, data, model" in lines[0], done.stderr[-3000:]
    assert (finished_run / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()


def test_start_over_removes_the_old_checkpoints(tmp_path):
    """What run.resume=none does to a run folder: its old checkpoints (and `latest`) go, so a later
    run.resume=latest can never continue the old run's state as the new one's."""
    from train.core.checkpoint import CheckpointManager

    for step in (4, 8):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000008")
    (tmp_path / "checkpoints" / "unrelated.txt").write_text("kept")
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    assert manager.resolve("latest") == tmp_path / "checkpoints" / "step_00000008"
    assert manager.resolve("none") is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["unrelated.txt"]
    assert manager.resolve("latest") is None


@pytest.mark.parametrize("what", ["missing folder", "a file", "a folder that is no run"])
def test_export_of_a_wrong_path_is_one_line_and_exit_2(tmp_path, what):
    path = {"missing folder": tmp_path / "runs" / "nope", "a file": ROOT / "README.md",
            "a folder that is no run": tmp_path}[what]
    done = subprocess.run([sys.executable, "-m", "train.export", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"error: {path}"), lines[0]
    expected = {"missing folder": "no such run", "a file": "is a file", "a folder that is no run": "neither"}[what]
    assert expected in lines[0]
