"""The throw-away SLURM cluster for tests, and a toy trainer that keeps the trainer's contract.

``slurm_cluster`` (session scope) brings up 2 nodes on this machine with slurm/cluster.sh and stops
them at the end; a cluster that is already up (``make cluster-up``) is reused and left running. Not
root, or slurm not installable: the tests that use it skip with the reason.

``toy_main`` is a stand-in for ``train.core.trainer.main`` with the same contract (``--config FILE
key=value ...``, run.run_dir, run.resume=latest; SIGUSR1/SIGTERM -> checkpoint at the next step
boundary and return exit_code 3, which ``python -m train`` exits with) but no model, so the launch
machinery is tested apart from the trainer. Its ranks really rendezvous (gloo, from the env the
launcher provides) and agree on stopping at each step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.jobs import EXIT_REQUEUE
from common.paths import REPO_ROOT

ROOT = REPO_ROOT
CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
STATE_DIR = Path(os.environ.get("CLIP_SLURM_DIR", "/tmp/clip-slurm"))


# --- the cluster ------------------------------------------------------------------------------

def _cluster(cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running 2-node cluster (set in os.environ for sbatch/submitit too)."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster needs root (it starts slurmd and edits /etc/hosts); run as root")
    reused = _cluster("status").returncode == 0
    if not reused:
        up = _cluster("up")
        if up.returncode != 0:
            if shutil.which("slurmctld") is None:
                pytest.skip(f"slurm could not be installed: {up.stderr.strip()[-500:]}")
            pytest.fail(f"slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    conf = str(STATE_DIR / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if not reused:
            down = _cluster("down")
            assert down.returncode == 0, down.stderr


def job_info(job_id: str | int) -> dict[str, str]:
    """`scontrol show job` as a dict (no sacct here: no accounting database)."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"([\w/:]+)=(\S*)", out))


def wait_state(job_id: str | int, states: set[str], timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {job_info(job_id)}")


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def slurm_rendezvous(job_id: str, nodelist: str) -> str:
    """MASTER_ADDR:MASTER_PORT as submitit's TorchDistributedEnvironment derives them for a SLURM job (the
    reference the launchers are checked against)."""
    from unittest import mock

    from submitit.helpers import TorchDistributedEnvironment

    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist}
    with mock.patch.dict(os.environ, job):
        for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_JOB_ID"):
            os.environ.pop(key, None)
        ref = TorchDistributedEnvironment()
        return f"{ref.master_addr}:{ref.master_port}"


# --- the toy trainer --------------------------------------------------------------------------

def _parse(argv: list[str]) -> tuple[str, dict[str, str]]:
    config, overrides, i = "", {}, 0
    while i < len(argv):
        if argv[i] == "--config":
            config, i = argv[i + 1], i + 2
            continue
        key, _, value = argv[i].partition("=")
        overrides[key] = value  # the last one wins, as with OmegaConf dotlists
        i += 1
    return config, overrides


def toy_main(argv: list[str]) -> dict:
    """Count ``optim.steps`` steps of ``toy.step_s`` seconds each, saving ``checkpoint.json`` (step)
    on a stop signal. Every rank appends {"rank", "step", "start", "pid"} to RUN_DIR/steps.jsonl."""
    import torch
    import torch.distributed as dist

    from train.core.distributed import discover_launcher_env

    config, kv = _parse(argv)
    run_dir = Path(kv.get("run.run_dir", "runs/toy"))
    steps = int(kv.get("optim.steps", "10"))
    step_s = float(kv.get("toy.step_s", "0.2"))
    found = discover_launcher_env()
    rank, world = int(found["RANK"]), int(found["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    ckpt = run_dir / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if kv.get("run.resume") == "latest" and ckpt.exists() else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "steps.jsonl", "a")
    step = start
    summary = {"rank": rank, "world_size": world, "start": start, "argv": argv,
               "master": f"{found['MASTER_ADDR']}:{found['MASTER_PORT']}"}
    try:
        while step < steps:
            # All ranks stop at the same step boundary, whoever got the signal.
            flag = torch.tensor([1 if stop else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                if rank == 0:
                    tmp = run_dir / "checkpoint.json.tmp"
                    tmp.write_text(json.dumps({"step": step}))
                    tmp.replace(ckpt)
                dist.barrier()
                return {**summary, "step": step, "exit_code": EXIT_REQUEUE}
            time.sleep(step_s)
            step += 1
            log.write(json.dumps({"rank": rank, "step": step, "start": start, "pid": os.getpid(),
                                  "master": summary["master"], "config": config, "seed": kv.get("seed"), "argv": argv}) + "\n")
            log.flush()
        dist.barrier()
        return {**summary, "step": step, "exit_code": 0}
    finally:
        log.close()
        dist.destroy_process_group()


def write_fake_python(folder: Path) -> Path:
    """An executable that slurm/*.sh can run as $PYTHON: `-m train ARGS` becomes toy_main(ARGS); any other
    command (`-m common.jobs ...`) runs in the real python."""
    path = folder / "toy-python"
    path.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "if sys.argv[1:3] != ['-m', 'train']:\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
        "from tests.harness.slurm_cluster import toy_main\n"
        "sys.exit(toy_main(sys.argv[3:])['exit_code'])\n")
    path.chmod(0o755)
    return path


def read_steps(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
