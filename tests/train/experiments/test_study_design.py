"""The study's design rules (train/experiments/study/design.py): the settling windows against numpy and the
cosine integral solved in closed form, and the grid extension driven through the study's own tuning loop."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq

from train.config import OptimConfig
from train.core.schedule import cosine_lr
from train.experiments.study import design
from train.experiments.study.run import Study


def test_the_steps_window_is_the_last_fifth_of_the_steps():
    assert design.window_start([1.0] * 2000, 0.2, "steps") == 1600
    assert design.window_start([1.0] * 10, 0.2, "steps") == 8


def test_at_a_constant_lr_both_readings_agree():
    lrs = [3e-3] * 1000
    assert abs(design.window_start(lrs, 0.2, "lr") - design.window_start(lrs, 0.2, "steps")) <= 1


def test_the_lr_window_under_cosine_matches_numpy_and_the_closed_form():
    o = OptimConfig(steps=2000, lr=3e-3, warmup_steps=0, min_lr=0.0)
    lrs = [cosine_lr(s, o) for s in range(o.steps)]
    start = design.window_start(lrs, 0.2, "lr")
    cumulative = np.cumsum(lrs)
    assert start == int(np.searchsorted(cumulative, 0.8 * cumulative[-1]))    # first step reaching 80% of Σ lr
    # ∫₀ˣ ½(1 + cos πu) du = ½(x + sin(πx)/π); the last 20% of the integral starts where it is 0.8 of ½
    x = brentq(lambda x: 0.5 * (x + math.sin(math.pi * x) / math.pi) - 0.4, 0, 1)
    assert start / o.steps == pytest.approx(x, abs=2e-3) and 0.45 < x < 0.5
    # ... so the literal window (the last 400 steps) carries only 1 − (0.8 + sin(0.8π)/π) ≈ 1.3% of Σ lr
    tail = 1 - (0.8 + math.sin(0.8 * math.pi) / math.pi)
    assert (cumulative[-1] - cumulative[1599]) / cumulative[-1] == pytest.approx(tail, rel=0.01) and tail < 0.014


def test_settling_reads_the_record_at_or_before_the_window_start():
    lrs = [1.0] * 100
    records = [{"step": s, "q": 10.0 + (s if s < 60 else 60) * 0.1} for s in range(0, 100, 25)] + [{"step": 99, "q": 16.0}]
    out = design.settling(records, "q", lrs)
    # the window starts at step 80; the last record at or before it is step 75 (q = 16): no change
    assert out["steps"]["start"] == 80 and out["steps"]["from"] == 75 and out["steps"]["change"] == 0.0 and out["settled"]
    rising = [{"step": s, "q": 10.0 + s} for s in range(0, 100, 25)] + [{"step": 99, "q": 109.0}]
    out = design.settling(rising, "q", lrs)
    assert out["lr"]["change"] == pytest.approx((109 - 85) / 109) and out["lr"]["from"] == 75 and not out["settled"]
    # records without the key (a probe every few records) are skipped; fewer than two is an error
    assert design.settling(records + [{"step": 100}], "q", lrs + [1.0])["end"] == 16.0
    with pytest.raises(ValueError, match="need at least 2"):
        design.settling([{"step": 0, "q": 1.0}], "q", lrs)
    with pytest.raises(ValueError, match="window"):
        design.window_start(lrs, 1.0, "lr")


@pytest.mark.parametrize("scores, expected", [
    ({0.01: 0.80, 0.02: 0.81, 0.05: 0.83, 0.1: 0.85}, 0.25),     # best at the top: ×2.5
    ({0.01: 0.85, 0.02: 0.81, 0.05: 0.80, 0.1: 0.79}, 0.005),    # best at the bottom: ×0.5
    ({0.01: 0.80, 0.02: 0.85, 0.05: 0.83, 0.1: 0.79}, None),     # bracketed
    ({0.01: 0.85, 0.02: 0.85, 0.05: 0.80}, 0.005),               # a tie goes to the smaller value
])
def test_next_grid_value(scores, expected):
    got = design.next_grid_value(scores, 0, 2)
    assert got == (None if expected is None else pytest.approx(expected))
    assert design.next_grid_value(scores, 2, 2) is None    # extensions spent
    assert design.at_edge(scores) == (expected is not None)


@pytest.mark.parametrize("peak, grid, tried", [
    (0.3, [0.01, 0.02, 0.05, 0.1], [0.01, 0.02, 0.05, 0.1, 0.25, 0.625]),   # 0.25 bracketed by 0.1 and 0.625
    (0.03, [0.01, 0.02, 0.05, 0.1], [0.01, 0.02, 0.05, 0.1]),               # bracketed as given
    (0.001, [0.01, 0.02, 0.05, 0.1], [0.01, 0.02, 0.05, 0.1, 0.005, 0.0025]),   # still at the edge: spent
])
def test_the_tuning_loop_extends_the_grid_until_it_brackets_the_best(peak, grid, tried):
    rows, logged = [], []

    def train(lam):    # a val score peaked at ``peak`` on a log scale
        rows.append({"lambda": lam, "val_top1": 0.9 - (math.log(lam) - math.log(peak)) ** 2 / 100})

    study = SimpleNamespace(cfg=SimpleNamespace(grid_extensions=2), log=logged.append)
    Study._grid(study, grid, train, "lambda", rows)
    assert [r["lambda"] for r in rows] == pytest.approx(tried)
    assert len(logged) == len(tried) - len(grid)


def test_the_best_row_breaks_ties_towards_the_weaker_regulariser():
    rows = [{"lambda": 0.1, "val_top1": 0.8}, {"lambda": 0.005, "val_top1": 0.85}, {"lambda": 0.01, "val_top1": 0.85}]
    assert design.best(rows, "lambda")["lambda"] == 0.005
    assert design.best(rows[:1], "lambda")["lambda"] == 0.1


@pytest.mark.parametrize("override, message", [
    ({"reference_size": 10}, "reference_size=10 < 30"),
    ({"test_size": 1}, "test_size=1: uniformity"),
    ({"test_size": 20000}, "test_size=20000 > the 10000 test images"),
    ({"finetune_batch": 20000}, "finetune_batch=20000 > finetune_size=9000"),
    ({"pretrain_size": 59900}, "> the 60000 training images"),
    ({"probe_size": 5000}, "probe_size=5000 > val_size=3000"),
    ({"pretrain_warmup": 2000}, "pretrain_warmup=2000 >= pretrain_steps=2000"),
    ({"baseline_pretrain_steps": 1}, "baseline_pretrain_steps=1"),
])
def test_sizes_that_do_not_fit_each_other_are_one_line_before_anything_is_built(override, message):
    from common.errors import UserError
    from train.experiments.study.config import StudyConfig

    StudyConfig().check_sizes()    # the defaults (= configs/study/cpu.yaml's sizes) fit
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        StudyConfig(**override).check_sizes()


def test_a_repeated_seed_is_refused():
    from common.config_loader import load_config
    from common.errors import ConfigError
    from train.experiments.study.config import StudyConfig

    with pytest.raises(ConfigError, match="seeds: \\[0, 0\\] repeats a value"):
        load_config(StudyConfig, None, ["seeds=[0,0]"])
