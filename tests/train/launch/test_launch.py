"""train/launch/executor.py (submitit): results, preemption requeue and job arrays, on the local executor and on
the real 2-node SLURM cluster, with the toy trainer of tests/harness/slurm_cluster.py (same contract as
train.core.trainer.main); the last test sweeps the real trainer. The real trainer under slurm/*.sh (requeue,
scancel, equality with torchrun) is tested in tests/slurm/test_slurm.py."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from common.jobs import RESUME_LATEST
from tests.harness.slurm_cluster import (ROOT, job_info, read_steps, slurm_cluster, slurm_rendezvous,  # noqa: F401
                                 wait_for)
from train.launch import executor
from train.launch.executor import LaunchOptions, TrainingJob, grid_points, point_name, submit, sweep

TOY = "tests.harness.slurm_cluster:toy_main"


def results(job, timeout: float = 180):
    """job.results() with a deadline: without sacct submitit cannot tell a dead job from a slow one."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            raise TimeoutError(f"job {job.job_id} gave no result in {timeout}s; stderr:\n{job.stderr()}")
        time.sleep(0.5)
    return job.results()


def check_steps(run_dir, steps_total: int, ranks=(0, 1), min_starts: int = 1) -> list[dict]:
    """Every rank saw steps 1..steps_total exactly once (no lost, no repeated step)."""
    steps = read_steps(run_dir)
    for rank in ranks:
        mine = [s for s in steps if s["rank"] == rank]
        assert [s["step"] for s in mine] == list(range(1, steps_total + 1)), rank
        assert len({s["start"] for s in mine}) >= min_starts
    return steps


# --- pure functions ---------------------------------------------------------------------------

def test_grid_points_are_the_product_in_order():
    grid = {"loss.cyclip_in_modal": [0, 0.25], "run.seed": [0, 1]}
    assert grid_points(grid) == [{"loss.cyclip_in_modal": 0, "run.seed": 0},
                                 {"loss.cyclip_in_modal": 0, "run.seed": 1},
                                 {"loss.cyclip_in_modal": 0.25, "run.seed": 0},
                                 {"loss.cyclip_in_modal": 0.25, "run.seed": 1}]
    assert point_name({"loss.cyclip_in_modal": 0.25, "run.seed": 1}) == "cyclip_in_modal-0.25_seed-1"
    assert point_name({"model.name": "ViT B/32"}) == "name-ViT-B-32"


def test_checkpoint_resubmits_the_same_call_resuming_from_latest():
    job = TrainingJob(TOY)
    overrides = ["a=1", "run.resume=/some/ckpt"]
    # First start: a checkpoint the user named wins (it comes after resume=latest)...
    assert job.argv("c.yaml", overrides) == ["--config", "c.yaml", RESUME_LATEST, *overrides]
    again = job.checkpoint("c.yaml", overrides)
    assert again.function.entry == TOY and again.args == ("c.yaml", overrides)
    # ...the requeued job continues its own run: resume=latest last, also after a second requeue.
    assert again.function.argv(*again.args) == ["--config", "c.yaml", *overrides, RESUME_LATEST]
    twice = again.function.checkpoint(*again.args)
    assert twice.function.argv(*twice.args) == ["--config", "c.yaml", *overrides, RESUME_LATEST]


def test_local_cluster_has_one_node():
    with pytest.raises(ValueError, match="nodes must be 1"):
        submit("c.yaml", cluster="local", nodes=2, entry=TOY)


def test_keyword_launch_options_reach_the_executor(monkeypatch):
    """The documented call submit(config, overrides, nodes=..., gpus_per_node=...) and sweep(...) fill
    LaunchOptions field by field; launch=LaunchOptions(...) is the same with keywords winning."""
    seen = []

    class Recorder:    # stands in for the submitit executor: what would be submitted, nothing queued
        def submit(self, job, config, overrides):
            return (job.entry, config, overrides)

        def map_array(self, job, configs, per_point):
            return [(job.entry, c, o) for c, o in zip(configs, per_point)]

    def fake_executor(opts, array_parallelism=1):
        seen.append((opts, array_parallelism))
        return Recorder()

    monkeypatch.setattr(executor, "_executor", fake_executor)
    assert submit("c.yaml", ["a=1"], nodes=2, gpus_per_node=8, partition="gpu", time=90, entry=TOY) == \
        (TOY, "c.yaml", ["a=1"])
    assert seen[-1] == (LaunchOptions(nodes=2, gpus_per_node=8, partition="gpu", time=90, job_name="clip-train"), 1)
    assert seen[-1][0].world_size == 16
    base = LaunchOptions(cluster="local", tasks_per_node=2, folder="f", job_name="mine")
    jobs = sweep("c.yaml", {"run.seed": [0, 1]}, ["run.run_dir=r"], base, array_parallelism=3, time=5, entry=TOY)
    assert [o[-1] for o in jobs] == [["run.run_dir=r", f"run.seed={s}", f"run.run_dir=r/seed-{s}"] for s in (0, 1)]
    assert seen[-1] == (LaunchOptions(cluster="local", tasks_per_node=2, folder="f", job_name="mine", time=5), 3)
    assert seen[-1][0].world_size == 2
    with pytest.raises(TypeError, match="unknown launch option.*gpus"):
        submit("c.yaml", gpus=8, entry=TOY)


# --- the local executor -----------------------------------------------------------------------

@pytest.mark.slow
def test_local_two_ranks_return_results_and_survive_preemption(tmp_path):
    """cluster="local": 2 tasks rendezvous; SIGTERM (a preemption) mid-run -> checkpoint, requeue,
    resume; the result arrives once, after the resumed run."""
    run_dir, total = tmp_path / "run", 24
    job = submit("my.yaml", [f"run.run_dir={run_dir}", f"optim.steps={total}", "toy.step_s=0.1"],
                 cluster="local", tasks_per_node=2, time=5, folder=tmp_path / "submitit", entry=TOY)
    wait_for(lambda: len(read_steps(run_dir)) >= 6, timeout=90, what="a few steps")
    job._process.send_signal(signal.SIGTERM)  # submitit's local controller forwards it to the tasks
    out = results(job)
    assert [r["rank"] for r in out] == [0, 1] and all(r["world_size"] == 2 for r in out)
    assert out[0]["step"] == total and out[0]["start"] > 0
    assert out[0]["argv"][-1] == RESUME_LATEST
    steps = check_steps(run_dir, total, min_starts=2)
    assert len({s["master"] for s in steps}) == 1  # both ranks, before and after the restart


# --- SLURM ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_two_nodes_results_and_requeue_on_signal(slurm_cluster, tmp_path):
    """2 nodes x 1 task through sbatch; SIGUSR1 (the time-limit warning submit() asks SLURM for)
    -> checkpoint, `scontrol requeue`, the same job id resumes from latest."""
    run_dir, total = tmp_path / "run", 40
    job = submit("my.yaml", [f"run.run_dir={run_dir}", f"optim.steps={total}", "toy.step_s=0.1"],
                 nodes=2, tasks_per_node=1, cpus_per_task=1, time=10, signal_delay_s=120,
                 folder=tmp_path / "submitit", entry=TOY)
    info = job_info(job.job_id)
    assert info["NumNodes"].startswith("2") and info["Requeue"] == "1", info
    wait_for(lambda: len(read_steps(run_dir)) >= 6, timeout=90, what="a few steps")
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    out = results(job)
    assert [r["rank"] for r in out] == [0, 1]
    # Both ranks, before and after the requeue, used the rendezvous submitit derives for this job.
    nodes = job_info(job.job_id)["NodeList"]
    assert {s["master"] for s in read_steps(run_dir)} == {slurm_rendezvous(job.job_id, nodes)}
    assert out[0]["start"] > 0 and out[0]["step"] == total
    assert job_info(job.job_id)["Restarts"] == "1"
    check_steps(run_dir, total, min_starts=2)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_is_a_job_array_with_one_run_dir_per_point(slurm_cluster, tmp_path):
    grid = {"seed": [0, 1]}
    jobs = sweep("my.yaml", grid, [f"run.run_dir={tmp_path}/sweep", "optim.steps=3", "toy.step_s=0.05"],
                 nodes=1, tasks_per_node=1, cpus_per_task=1, time=10, folder=tmp_path / "submitit", entry=TOY)
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(jobs) == 2 and len(array_ids) == 1, [j.job_id for j in jobs]  # one array, 2 tasks
    for job, seed in zip(jobs, (0, 1)):
        (out,) = results(job)
        assert out["step"] == 3 and f"seed={seed}" in out["argv"]
        steps = check_steps(tmp_path / "sweep" / f"seed-{seed}", 3, ranks=(0,))
        assert {s["seed"] for s in steps} == {str(seed)}


@pytest.mark.slow
def test_cli_submits_locally_and_prints_the_result(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "train.launch", "--entry", TOY, "--config", "my.yaml",
                          "--cluster", "local", "--folder", str(tmp_path / "s"), "--wait",
                          f"run.run_dir={run_dir}", "optim.steps=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert '"step": 2' in out.stdout and "submitted" in out.stdout
    check_steps(run_dir, 2, ranks=(0,))


@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_of_the_trainer_over_cyclip_lambda_completes_both_points(slurm_cluster, tmp_path):
    from tests.harness.data_fixtures import make_digits_dataset

    dataset = make_digits_dataset(tmp_path / "ds", n_train=64, n_val=16, shard_size=32)
    jobs = sweep(ROOT / "configs" / "pretrain_cyclip.yaml", {"loss.cyclip_in_modal": [0.0, 0.25]},
                 [f"data.path={dataset}", f"run.run_dir={tmp_path}/sweep", "optim.steps=3", "data.global_batch_size=16",
                  "data.num_workers=0", "loss.cyclip_cross_modal=0.0", "logging.progress_bar=false",
                  "logging.tensorboard=false", "checkpoint.export=false"],
                 nodes=1, tasks_per_node=1, cpus_per_task=1, time=10, folder=tmp_path / "submitit")
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one job array
    runs = []
    for job, lam in zip(jobs, ("0.0", "0.25")):
        (out,) = results(job, timeout=300)
        assert (out["exit_code"], out["step"]) == (0, 3)
        run_dir = tmp_path / "sweep" / f"cyclip_in_modal-{lam}"
        assert out["run_dir"] == str(run_dir)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())  # what the trainer ran with
        assert config["loss"]["cyclip_in_modal"] == float(lam)
        runs.append((config, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]))
    # lambda = 0 computes no regulariser; lambda = 0.25 adds lambda x (N_ref / N) x the logged in-modal
    # term to the CLIP term (CyCLIP's weight rescaled from its reference batch, docs/METHODS.md).
    assert all("cyclip_in" not in m for m in runs[0][1])
    config, metrics = runs[1]
    weight = 0.25 * config["loss"]["cyclip_reference_batch"] / config["data"]["global_batch_size"]
    assert weight == 0.25 * 512 / 16
    for m in metrics:
        assert m["cyclip_in"] > 0 and math.isclose(m["loss"], m["clip"] + weight * m["cyclip_in"], rel_tol=1e-5)


# --- config mistakes stop before sbatch -------------------------------------------------------

FAKE_SBATCH = """#!/bin/sh
# A stand-in for sbatch (a mock: no cluster in this test): records that it was called, answers like sbatch.
echo "$@" >> "{marker}"
echo "Submitted batch job 4242"
"""


def launch_cli(tmp_path, *args):
    """`python -m train.launch` with a fake sbatch first on PATH; returns (result, whether sbatch ran)."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "sbatch_called"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(marker=marker))
    (bin_dir / "sbatch").chmod(0o755)
    marker.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-m", "train.launch", "--folder", str(tmp_path / "s"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    return out, marker.exists()


def test_cli_config_mistakes_fail_in_one_line_before_sbatch(tmp_path):
    from tests.harness.data_fixtures import make_digits_dataset

    data = make_digits_dataset(tmp_path / "ds", n_train=64, n_val=16, shard_size=32)
    base = ["--config", "configs/pretrain_cyclip.yaml", f"data.path={data}", "data.global_batch_size=16",
            f"run.run_dir={tmp_path / 'run'}"]
    cases = {   # argv -> text the one line must contain (the key or file to fix)
        ("--config", str(tmp_path / "nope.yaml")): "nope.yaml",
        (*base, "optim.nope=1"): "optim.nope",
        (*base, "loss.cyclip_in_modal=-1"): "loss.cyclip_in_modal must be >= 0, got -1.0",
        (*base, f"data.path={tmp_path / 'missing'}"): "missing does not exist",
        (*base, "data.split=nosuch"): "data.split=nosuch",
        (*base, "--gpus-per-node", "3"): "data.global_batch_size=16",         # 16 does not split into 3 ranks
        (*base, f"run.resume={tmp_path / 'no_ckpt'}"): "no_ckpt",
        (*base, "--sweep", "loss.cyclip_in_modal=0.25,-1"): "sweep point cyclip_in_modal--1",
        (*base, "--sweep", "optim.typo=1,2"): "optim.typo",
        (*base, "--sweep", "novalues"): "--sweep",
        (*base, "--nodes", "0"): "--nodes",
    }
    def run_case(i_argv):    # each case with its own fake sbatch and marker
        i, argv = i_argv
        (tmp_path / f"case{i}").mkdir()
        return launch_cli(tmp_path / f"case{i}", *argv)

    with ThreadPoolExecutor(3) as pool:    # ~1.5 s of imports each: run them side by side
        outcomes = list(pool.map(run_case, enumerate(cases)))
    for (argv, expected), (out, submitted) in zip(cases.items(), outcomes):
        assert out.returncode == 2, (argv, out.stderr)
        assert not submitted, argv
        lines = out.stderr.strip().splitlines()
        # A path that cannot be used is an InputError ("error: "), a bad value a ConfigError (common/errors.py).
        label = "error: " if expected in ("missing does not exist", "no_ckpt") else "config error: "
        assert len(lines) == 1 and lines[0].startswith(label) and expected in lines[0], (argv, lines)
        assert "Traceback" not in out.stderr
    # the same config without the mistake does reach sbatch (the check is not a blanket refusal)
    out, submitted = launch_cli(tmp_path, *base)
    assert submitted and out.returncode == 0 and "submitted 4242" in out.stdout, out.stderr
    # --no-preflight checks the config only: data that only the compute nodes see is not looked for
    out, submitted = launch_cli(tmp_path, *base, f"data.path={tmp_path / 'on_nodes_only'}", "--no-preflight")
    assert submitted and out.returncode == 0, out.stderr
