"""Issue 23 row 12: SLURM's time-limit warning (USR1) while the trainer is still starting up (imports,
DeepSpeed's op load, before the rendezvous) requeues the job through slurm/pretrain.sh, with a line in the
logs, instead of a FAILED job (USR1's default action, rc 138). One short real job on the 2-node cluster."""
from __future__ import annotations

import subprocess
import time

import pytest

from common.jobs import EXIT_REQUEUE
from tests.harness.slurm_cluster import wait_for, wait_state, slurm_cluster  # noqa: F401
from tests.slurm.test_slurm import DONE, _submit_pretrain, digits  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_usr1_during_startup_requeues_through_pretrain_sh(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    jid = _submit_pretrain(digits, tmp_path, run_dir, steps=2)
    job_dir = tmp_path / "logs" / f"clip-pretrain-{jid}"
    wait_for(lambda: (job_dir / "rank-0.log").exists(), timeout=60, what="the first task to start")
    time.sleep(1.0)   # python is running, torch still importing: long before the first step
    assert not (run_dir / "metrics.jsonl").exists()
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)
    info = wait_state(jid, DONE, timeout=240)
    batch = (job_dir / "batch.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, batch[-2000:])
    assert f"srun exit code {EXIT_REQUEUE}" in batch and f"requeueing job {jid}" in batch, batch[-2000:]
    assert "during start-up: exiting with 3" in (job_dir / "rank-0.log").read_text()
    assert [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
