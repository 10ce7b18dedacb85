"""common/jobs.py: the launcher contract, in Python and through its shell CLI (a real subprocess)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common.jobs import EXIT_REQUEUE, LAUNCHER_VARS, RESUME_LATEST, resume_overrides
from tests.harness.slurm_cluster import ROOT

# Shell-hostile overrides: spaces, '=' inside the value, a newline, quotes and a glob.
HOSTILE = ["note=a b", "path=x=y=z", "text=line one\nline two", "q='\"*\"'", ""]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.jobs", *args], cwd=ROOT, capture_output=True, timeout=60)


def test_first_start_user_overrides_come_after_resume_latest():
    # A user who names a checkpoint to start from wins on the first start (OmegaConf: the last one wins).
    assert resume_overrides(["a=1", "run.resume=/ckpt"], restarted=False) == [RESUME_LATEST, "a=1",
                                                                              "run.resume=/ckpt"]


def test_restart_puts_resume_latest_last():
    # After a requeue the job must continue its own run, whatever checkpoint it first started from.
    assert resume_overrides(["a=1", "run.resume=/ckpt"], restarted=True) == ["a=1", "run.resume=/ckpt",
                                                                             RESUME_LATEST]


@pytest.mark.parametrize("restarted", [False, True])
def test_rule_is_idempotent_and_keeps_one_resume_latest(restarted):
    once = resume_overrides(["a=1", RESUME_LATEST, "b=2"], restarted)
    assert resume_overrides(once, restarted) == once
    assert once.count(RESUME_LATEST) == 1 and [o for o in once if o != RESUME_LATEST] == ["a=1", "b=2"]
    # A first start followed by a restart (what a requeued job runs) ends with resume=latest.
    assert resume_overrides(resume_overrides(["a=1"], False), True) == ["a=1", RESUME_LATEST]


def test_cli_train_args_is_nul_separated_and_verbatim():
    first = cli("train-args", "0", *HOSTILE)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().split("\0") == [RESUME_LATEST, *HOSTILE, ""]  # every item NUL-terminated
    again = cli("train-args", "2", *HOSTILE)
    assert again.stdout.decode().split("\0") == [*HOSTILE, RESUME_LATEST, ""]


def test_cli_through_bash_mapfile_keeps_each_argument_whole():
    """What slurm/_common.sh does: `mapfile -d ''` of the CLI's output gives back the same argv."""
    script = ('mapfile -d "" args < <("$0" -m common.jobs train-args 1 "$@"); '
              'printf "%s\\0" "${#args[@]}" "${args[@]}"')
    out = subprocess.run(["bash", "-c", script, sys.executable, *HOSTILE], cwd=ROOT, capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    count, *args = out.stdout.decode().split("\0")[:-1]
    assert int(count) == len(HOSTILE) + 1 and args == [*HOSTILE, RESUME_LATEST]


def test_cli_constants_and_usage_error():
    assert cli("exit-requeue").stdout.decode().strip() == str(EXIT_REQUEUE) == "3"
    assert tuple(cli("launcher-vars").stdout.decode().split()) == LAUNCHER_VARS
    for bad in (["train-args"], ["train-args", "x"], ["nope"], []):
        out = cli(*bad)
        assert out.returncode == 64 and b"usage:" in out.stderr and out.stdout == b"", bad
