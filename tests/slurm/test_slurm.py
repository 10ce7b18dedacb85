"""slurm/cluster.sh and slurm/pretrain.sh, finetune.sh on a real 2-node SLURM cluster (root only).

The launch plumbing (arguments, rendezvous, log folder) is checked with the toy trainer of
tests/harness/slurm_cluster.py; the tests at the end run the real trainer (requeue on the time-limit
signal, scancel) against an independent local torchrun run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.jobs import EXIT_REQUEUE, RESUME_LATEST
from tests.harness.slurm_cluster import (ROOT, job_info, read_steps, slurm_cluster, slurm_rendezvous,  # noqa: F401
                                 wait_for, wait_state, write_fake_python)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# The scripts' GPU defaults do not fit this CPU-only cluster; a CPU run overrides them the same way.
CPU_2_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def sbatch(args: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_two_nodes_run_one_task_each(slurm_cluster, tmp_path):
    jid = sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/out",
                  "--wrap", "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME'"], tmp_path)
    info = wait_state(jid, DONE, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert sorted((tmp_path / "out").read_text().split("\n")[:2]) == ["0 n1", "1 n2"]


def test_sbatch_command_line_overrides_script_defaults(slurm_cluster, tmp_path):
    jid = sbatch(["--hold", *CPU_2_NODES[:-1], "--time=7", str(ROOT / "slurm" / "pretrain.sh")], tmp_path)
    try:
        info = job_info(jid)
    finally:
        subprocess.run(["scancel", jid])
    # From the command line...
    assert (info["NumNodes"], info["CPUs/Task"], info["TimeLimit"]) == ("2-2", "1", "00:07:00")
    # ...and from the #SBATCH header where not overridden.
    assert (info["JobName"], info["Requeue"]) == ("clip-pretrain", "1")


@pytest.mark.parametrize("script", ["pretrain.sh", "finetune.sh"])
def test_script_passes_arguments_verbatim_with_rendezvous_and_log_folder(slurm_cluster, tmp_path, script):
    python = write_fake_python(tmp_path)
    run_dir = tmp_path / "run"
    hostile = 'note=a b $(touch {}) "q" \'s\' ;*\nsecond line'.format(tmp_path / "pwned")
    jid = sbatch([*CPU_2_NODES, str(ROOT / "slurm" / script), "my.yaml", f"run.run_dir={run_dir}",
                  "optim.steps=3", "toy.step_s=0.05", hostile],
                 tmp_path, env={"PYTHON": str(python), "LOG_ROOT": str(tmp_path / "logs")})
    info = wait_state(jid, DONE, timeout=120)
    assert info["JobState"] == "COMPLETED", (info, _logs(tmp_path))
    steps = read_steps(run_dir)
    assert sorted((s["rank"], s["step"]) for s in steps) == [(r, k) for r in (0, 1) for k in (1, 2, 3)]
    # Exactly the arguments given, in order, after the default resume=latest: nothing re-split or run.
    assert steps[0]["argv"] == ["--config", "my.yaml", RESUME_LATEST, f"run.run_dir={run_dir}",
                                "optim.steps=3", "toy.step_s=0.05", hostile]
    # Both ranks met where submitit says this job meets (first host of the allocation, job-id port).
    assert {s["master"] for s in steps} == {slurm_rendezvous(jid, info["NodeList"])}
    assert slurm_rendezvous(jid, info["NodeList"]).startswith("n1:")
    assert not (tmp_path / "pwned").exists()
    # Per-job log folder: the batch log and one log per rank.
    job_dir = tmp_path / "logs" / f"{info['JobName']}-{jid}"
    assert sorted(p.name for p in job_dir.iterdir()) == ["batch.log", "rank-0.log", "rank-1.log"]
    assert "srun exit code 0" in (job_dir / "batch.log").read_text()


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(folder.rglob("*.log")))


def test_cluster_down_stops_its_daemons_and_cleans_hosts(tmp_path):
    """A second, private cluster (own state dir and ports) goes up and down without touching the first."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and slurm installed (see the slurm_cluster fixture)")
    env = {**os.environ, "CLIP_SLURM_DIR": str(tmp_path / "c"), "CLIP_SLURM_PORT": "17400"}
    up = subprocess.run(["bash", "slurm/cluster.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr
        pids = {p.name: int(p.read_text()) for p in (tmp_path / "c" / "run").glob("*.ours")}
        assert {"slurmctld.ours", "slurmd-n1.ours", "slurmd-n2.ours"} <= set(pids)
        assert f"n1 n2 # clip-slurm-cluster {tmp_path / 'c'}" in Path("/etc/hosts").read_text()
    finally:
        down = subprocess.run(["bash", "slurm/cluster.sh", "down"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} ({pid}) still running"
    assert str(tmp_path / "c") not in Path("/etc/hosts").read_text()


# --- the real trainer through slurm/pretrain.sh ------------------------------------------------

TRAIN_STEPS = 16


def _train_overrides(dataset: Path, run_dir: Path, steps: int = TRAIN_STEPS) -> list[str]:
    return [f"data.path={dataset}", f"run.run_dir={run_dir}", f"optim.steps={steps}", "optim.warmup_steps=2",
            "data.global_batch_size=16", "data.num_workers=0", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.log_sample_keys=true",
            "checkpoint.every_steps=1000", "checkpoint.export=false"]  # only signal-driven checkpoints


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from tests.harness.data_fixtures import make_digits_dataset

    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "ds", n_train=96, n_val=16, shard_size=32)


@pytest.fixture(scope="module")
def torchrun_reference(digits, tmp_path_factory) -> Path:
    """The independent reference: the same run on 2 local ranks under torchrun, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29631", "-m", "train",
                          "--config", str(ROOT / "configs" / "pretrain_clip.yaml"),
                          *_train_overrides(digits, run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _keys(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines()]


def _submit_pretrain(digits: Path, tmp_path: Path, run_dir: Path, steps: int = TRAIN_STEPS) -> str:
    return sbatch([*CPU_2_NODES, str(ROOT / "slurm" / "pretrain.sh"), str(ROOT / "configs" / "pretrain_clip.yaml"),
                   *_train_overrides(digits, run_dir, steps)],
                  tmp_path, env={"PYTHON": sys.executable, "LOG_ROOT": str(tmp_path / "logs")})


def test_pretrain_on_two_nodes_equals_torchrun_across_a_requeue(slurm_cluster, digits, torchrun_reference, tmp_path):
    """sbatch slurm/pretrain.sh, 2 nodes x 1 task (DeepSpeed over gloo between the "nodes"), with the
    time-limit warning (SIGUSR1) forced mid-run: the job checkpoints, requeues itself, resumes from
    latest, and its loss trajectory and sample keys equal the uninterrupted local torchrun run."""
    run_dir = tmp_path / "run"
    jid = _submit_pretrain(digits, tmp_path, run_dir)
    wait_for(lambda: _steps_logged(run_dir) >= 2, timeout=150, what="two training steps")
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)
    info = wait_state(jid, DONE, timeout=240)
    assert info["JobState"] == "COMPLETED", (info, _logs(tmp_path))
    assert info["Restarts"] == "1", "the signal came too late to requeue: make TRAIN_STEPS larger"
    got, want = _metrics(run_dir), _metrics(torchrun_reference)
    assert [m["step"] for m in got] == list(range(1, TRAIN_STEPS + 1))  # no lost, no repeated step
    # CPU, same world size, same data order: the resumed run is expected to be bit-exact.
    assert [(m["loss"], m["logit_scale"]) for m in got] == [(m["loss"], m["logit_scale"]) for m in want]
    for rank in (0, 1):
        assert _keys(run_dir, rank) == _keys(torchrun_reference, rank)
    job_dir = tmp_path / "logs" / f"clip-pretrain-{jid}"
    batch = (job_dir / "batch.log").read_text()
    assert f"srun exit code {EXIT_REQUEUE}" in batch and "restart=1" in batch
    # Each rank logs its rank and the rendezvous, the same before and after the requeue.
    rendezvous = f"rendezvous {slurm_rendezvous(jid, info['NodeList'])}"
    for rank in (0, 1):
        assert (job_dir / f"rank-{rank}.log").read_text().count(rendezvous) == 2, rank


def test_scancel_mid_run_leaves_a_loadable_checkpoint(slurm_cluster, digits, tmp_path):
    """scancel sends SIGTERM: the trainer saves at the next step boundary before SLURM's KillWait."""
    import torch

    from train.core.checkpoint import CheckpointManager
    from train.config import ModelConfig
    from train.model.build import build_model

    run_dir = tmp_path / "run"
    jid = _submit_pretrain(digits, tmp_path, run_dir, steps=400)
    wait_for(lambda: _steps_logged(run_dir) >= 2, timeout=150, what="two training steps")
    subprocess.run(["scancel", jid], check=True)
    assert wait_state(jid, DONE, timeout=120)["JobState"] == "CANCELLED"
    # The job reads CANCELLED at once; its tasks still have KillWait (30 s) to save and leave.
    manager = CheckpointManager(run_dir, keep_last=2, rank=0)
    latest = wait_for(manager.latest, timeout=40, what=f"a complete checkpoint in {run_dir / 'checkpoints'}")
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip(),
             timeout=40, what="the job's processes to end")
    state = CheckpointManager.load_trainer_state(latest)
    assert 2 <= state["step"] < 400 and state["step"] == _metrics(run_dir)[-1]["step"]
    module = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = build_model(ModelConfig())[0]
    model.load_state_dict(module, strict=True)
