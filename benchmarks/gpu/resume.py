"""The resume part: tiny_vit, bf16, NCCL at world size 1 (gloo on the CPU), ``tiny_steps`` steps, a checkpoint
every ``tiny_every``. A second run is SIGKILLed (kill -9 from outside) as soon as its last-but-one checkpoint is
committed; it resumes from there and must end within RESUME_RTOL of the uninterrupted run. The only part that
writes checkpoints (tiny ones). Each trainer process is killed after ``run_s`` seconds."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.gpu.parts import ROOT, Budget, check_env
from train.launch.local import launch_ranks, log_tail, wait_ranks

RESUME_RTOL = 1e-2
"""Resumed vs uninterrupted, every loss term of the resumed steps: GPU kernels (atomics in some backward passes,
autotuned algorithms) are not bit-deterministic, so the resumed run may drift by bf16 rounding."""


def _train(args: list[str], log_dir: Path, name: str, s: dict, budget: Budget, kill_after: str | None = None) -> int:
    """``python -m train ARGS`` as rank 0 of 1; its exit code. With ``kill_after`` (a checkpoint tag), SIGKILL it
    from outside as soon as ``checkpoints/latest`` names that tag. Killed after min(run_s, budget left) s."""
    run_dir = Path(next(a for a in args if a.startswith("run.run_dir=")).split("=", 1)[1])
    limit = max(1.0, min(s["run_s"], budget.left()))
    (proc,) = launch_ranks(log_dir, name, 1, args, threads=s["threads"], extra_env=check_env())
    if kill_after is not None:
        latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == kill_after:
                proc.kill()
                break
            time.sleep(0.005)
    try:
        return wait_ranks([proc], timeout=limit)[0]
    except Exception as err:
        raise RuntimeError(f"{name} ran past {limit:.0f} s and was killed: {log_tail(log_dir, name)}") from err


def resume(tmp: Path, data: Path, s: dict, budget: Budget) -> dict:
    """Uninterrupted vs killed-and-resumed tiny_vit bf16 runs; the largest relative difference of their loss
    terms over the resumed steps, and ok when it is within RESUME_RTOL and every loss is finite."""
    from common.jobs import resume_overrides

    base = ["--config", str(ROOT / "configs" / "pretrain_cyclip.yaml"), f"data.path={data}", "zero.precision=bf16",
            "data.global_batch_size=64", f"optim.steps={s['tiny_steps']}", "optim.warmup_steps=2",
            f"checkpoint.every_steps={s['tiny_every']}", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.export=false"]
    resume_tag = f"step_{s['tiny_steps'] - s['tiny_every']:08d}"
    runs = {}
    for name in ("uninterrupted", "resumed"):
        run_dir = tmp / f"tiny_{name}"
        args = resume_overrides(base + [f"run.run_dir={run_dir}"], restarted=True)
        if name == "resumed":
            code = _train(args, tmp, name, s, budget, kill_after=resume_tag)
            latest_file = run_dir / "checkpoints" / "latest"
            latest = latest_file.read_text().strip() if latest_file.is_file() else None
            if code != -9 or latest != resume_tag:
                raise RuntimeError(f"the run to kill exited with {code} and its latest checkpoint is {latest}, not "
                                   f"SIGKILL after {resume_tag}: {log_tail(tmp, name)}")
        budget.check(f"the {name} run")
        code = _train(args, tmp, name, s, budget)
        if code != 0:
            raise RuntimeError(f"tiny {name} run exited with {code}: {log_tail(tmp, name)}")
        runs[name] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    a, b = runs["uninterrupted"], runs["resumed"]
    if not [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, s["tiny_steps"] + 1)):
        raise RuntimeError("the resumed run's steps do not line up with the uninterrupted run's")
    tail = range(s["tiny_steps"] - s["tiny_every"], s["tiny_steps"])
    worst = max(abs(b[i][t] - a[i][t]) / max(abs(a[i][t]), 1e-6) for i in tail for t in ("loss", "clip"))
    return {"final_loss": a[-1]["loss"], "resumed_final_loss": b[-1]["loss"], "max_rel_diff": worst,
            "rtol": RESUME_RTOL, "ok": worst <= RESUME_RTOL and all(math.isfinite(r["loss"]) for r in a + b)}
