"""The trainer's decisions, tested alone (no model, data or DeepSpeed) against hand-written expectations:
when to save (SaveSchedule), when to skip or abort (NonFinitePolicy), when to stop (StopPolicy), and that
the rank agreement sums and averages what it should across 2 real gloo processes."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.net import free_port
from train.core.checkpoint import SaveSchedule
from train.core.policies import NonFinitePolicy, RankAgreement, StopPolicy
from train.core.state import TrainProgress


def run_loop(schedule: SaveSchedule, start: int, total: int, stop_at: int | None = None) -> list:
    """The trainer's save calls, in the order fit() makes them, for steps start+1..total (or a stop)."""
    saves = []
    for step in range(start + 1, total + 1):
        if schedule.periodic(step):
            saves.append(step), schedule.saved(step)
        if step < total and step == stop_at:
            if schedule.final(step):
                saves.append(step), schedule.saved(step)
            return saves
    if schedule.final(total):
        saves.append(total), schedule.saved(total)
    return saves


@pytest.mark.parametrize("every, total, resumed_at, stop_at, expected", [
    (3, 10, None, None, [3, 6, 9, 10]),       # fresh run: every 3 steps, then the final one
    (3, 9, None, None, [3, 6, 9]),            # the last periodic step is the end: saved once, not twice
    (3, 10, 6, None, [9, 10]),                # resumed at its step-6 checkpoint: 6 is not written again
    (3, 10, None, 7, [3, 6, 7]),              # a stop at 7 saves at 7
    (3, 10, None, 6, [3, 6]),                 # a stop right after a periodic save writes nothing new
    (3, 10, 10, None, []),                    # resumed at the end: nothing to write
    (20, 10, None, None, [10]),               # every_steps past the end: only the final save
])
def test_save_schedule(every, total, resumed_at, stop_at, expected):
    start = resumed_at or 0
    assert run_loop(SaveSchedule(every, total, resumed_at), start, total, stop_at) == expected


def test_nonfinite_policy_skips_counts_and_aborts_at_the_limit(caplog):
    policy, progress = NonFinitePolicy(max_in_row=3), TrainProgress()
    history = [True, False, False, True, False, False]
    for step, finite in enumerate(history, start=1):
        progress.step = step
        policy.record(progress, finite)
    assert (progress.nonfinite_total, progress.nonfinite_in_row) == (4, 2)  # a finite step resets the run
    assert sum("non-finite loss, step skipped" in r.getMessage() for r in caplog.records) == 4
    progress.step = 7
    with pytest.raises(FloatingPointError, match=r"^3 consecutive steps had a NaN/inf loss \(last at step 7\)"):
        policy.record(progress, False)


def test_stop_policy_on_signal_and_on_step_limit():
    assert not StopPolicy(0).wants_stop(10**6)               # 0 = never by count
    assert [StopPolicy(3).wants_stop(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    policy = StopPolicy(0)
    previous = {s: signal.getsignal(s) for s in StopPolicy.SIGNALS}
    try:
        policy.install()
        os.kill(os.getpid(), signal.SIGUSR1)                 # a real signal, handled by the policy
        assert policy.wants_stop(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _agree_worker(rank: int, port: int, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agree = RankAgreement(torch.device("cpu"), world_size=2)
        terms = {"loss": torch.tensor([1.0, 3.0][rank]), "clip": torch.tensor([0.5, 1.5][rank])}
        step = agree.step_sync(terms, stop=rank == 1, skipped=[2, 5][rank])
        nan = agree.step_sync({"loss": torch.tensor([1.0, float("nan")][rank])}, stop=False, skipped=0)
        out.put((rank, step.terms, step.skipped, step.stop, step.finite, nan.finite, nan.stop,
                 agree.any(rank == 1), agree.any(False)))
    finally:
        dist.destroy_process_group()


def test_rank_agreement_over_two_real_ranks():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # Both ranks get the same answers: the mean of the terms, the sum of the counts, any-of the flags; a NaN
    # loss on one rank is not finite on both.
    for rank, terms, skipped, stop, finite, nan_finite, nan_stop, any_one, any_none in results:
        assert terms == {"clip": 1.0, "loss": 2.0} and skipped == 7
        assert (stop, finite, nan_finite, nan_stop, any_one, any_none) == (True, True, False, False, True, False)
