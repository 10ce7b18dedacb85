"""train/experiments/claims.py: the one verdict rule against intervals computed by hand, and the registry."""
from __future__ import annotations

import math

import pytest

from train.experiments import claims

TOP1 = next(c for c in claims.CLAIMS if (c.arm, c.metric) == ("cyclip", "zero_shot.top1"))
ECE = next(c for c in claims.CLAIMS if (c.arm, c.metric) == ("m2mix", "zero_shot.ece"))


def test_t_interval_by_hand():
    # gains 0.01, 0.02, 0.03, 0.04: mean 0.025, sample sd sqrt(((.015)² + (.005)² + (.005)² + (.015)²)/3) =
    # 0.0129099; t(0.975, 3) = 3.182446 (table value) → half-width 3.182446 · 0.0129099 / 2 = 0.0205431.
    v = claims.judge(TOP1, [0.51, 0.52, 0.53, 0.54], [0.50] * 4)
    assert (v.n, v.status) == (4, "shows")
    assert v.gain == pytest.approx(0.025)
    assert v.lo == pytest.approx(0.025 - 0.0205431, abs=1e-6) and v.hi == pytest.approx(0.025 + 0.0205431, abs=1e-6)
    assert v.arm_mean == pytest.approx(0.525) and v.baseline_mean == pytest.approx(0.5)


def test_lower_is_better_flips_the_sign():
    # ECE: the arm's higher values are a loss; gains −0.01..−0.04, the interval lies below 0.
    v = claims.judge(ECE, [0.51, 0.52, 0.53, 0.54], [0.5] * 4)
    assert v.status == "reversed" and v.gain == pytest.approx(-0.025) and v.hi < 0
    assert claims.judge(ECE, [0.49, 0.48, 0.47, 0.46], [0.5] * 4).status == "shows"


def test_an_interval_containing_zero_is_not_resolved():
    # gains +0.02, −0.02, +0.01, −0.01: mean 0, sd sqrt((4e-4·2 + 1e-4·2)/3) = 0.0182574;
    # half-width 3.182446 · 0.0182574 / 2 = 0.0290517.
    v = claims.judge(TOP1, [0.52, 0.48, 0.51, 0.49], [0.5] * 4)
    assert v.status == "not resolved"
    assert v.lo == pytest.approx(-0.0290517, abs=1e-6) and v.hi == pytest.approx(0.0290517, abs=1e-6)


def test_pairing_uses_the_seeds_not_the_arm_spreads():
    # Large spread across seeds, but every seed gains exactly 0.01: an unpaired rule would see noise,
    # the paired one sees sd(d) = 0, a zero-width interval above 0.
    v = claims.judge(TOP1, [0.31, 0.61, 0.91], [0.30, 0.60, 0.90])
    assert v.status == "shows" and v.lo == pytest.approx(0.01) and v.hi == pytest.approx(0.01)
    # Two seeds: t(0.975, 1) = 12.706205; gains 0.01, 0.03 → sd 0.0141421, half 12.706205 · 0.0141421 / √2 = 0.127062.
    v = claims.judge(TOP1, [0.51, 0.53], [0.5, 0.5])
    assert v.status == "not resolved" and v.hi - v.gain == pytest.approx(0.127062, abs=1e-5)


def test_one_seed_cannot_be_judged():
    v = claims.judge(TOP1, [0.6], [0.5])
    assert v.status == "one seed" and v.lo is None and v.hi is None and v.gain == pytest.approx(0.1)
    assert "no spread" in claims.sentence(v, "CyCLIP", "CLIP")
    assert "one seed" in claims.summary([v])
    assert "—" in claims.verdict_table([("CyCLIP vs CLIP", v)])


def test_mismatched_pairs_and_directionless_metrics_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        claims.judge(TOP1, [0.5, 0.6], [0.5])
    gap = claims.Claim("cyclip", "clip", "embedding.modality_gap", "x", "y")
    with pytest.raises(ValueError, match="no better direction"):
        claims.judge(gap, [0.5, 0.6], [0.5, 0.5])


def test_registry_keys_and_lookup():
    assert all(c.metric in claims.METRIC and claims.METRIC[c.metric].higher is not None for c in claims.CLAIMS)
    assert {c.arm for c in claims.CLAIMS} | {c.baseline for c in claims.CLAIMS} <= set(claims.ARMS)
    result = {"zero_shot": {"top1": 0.75}, "robustness": {"shifted_top1": 0.5}}
    assert claims.value(result, "zero_shot.top1") == 0.75 and claims.value(result, "zero_shot.ece") is None
    # judge_arms judges only the claims whose metric every result has, pairing result i with result i.
    evals = {"cyclip": [result, {**result, "zero_shot": {"top1": 0.85}}], "clip": [result, result]}
    judged = claims.judge_arms(evals, "cyclip", "clip")
    assert [v.claim.metric for v in judged] == ["zero_shot.top1", "robustness.shifted_top1"]
    assert judged[0].gain == pytest.approx(0.05) and judged[1].gain == 0.0


def test_summary_counts():
    vs = [claims.judge(TOP1, [0.51, 0.52, 0.53, 0.54], [0.5] * 4),
          claims.judge(ECE, [0.51, 0.52, 0.53, 0.54], [0.5] * 4),
          claims.judge(TOP1, [0.52, 0.48, 0.51, 0.49], [0.5] * 4)]
    assert claims.summary(vs).startswith("Of 3 claimed effects, 1 show")
    assert "1 are not resolved" in claims.summary(vs) and "and 1 are reversed" in claims.summary(vs)
    assert math.isclose(claims.t_quantile(0.975, 3), 3.182446, abs_tol=1e-6)


def test_experiment_configs_load_without_torch():
    # A study or demo config is checked before `make study` / `make demo` build anything: no torch import.
    import subprocess
    import sys

    from common.paths import REPO_ROOT

    code = ("import sys; from common.config_loader import load_config; "
            "from train.experiments.study.config import StudyConfig; from train.experiments.demo.config import DemoConfig; "
            "s = load_config(StudyConfig, 'configs/study/cpu.yaml', ['pretrain_steps=7']); "
            "d = load_config(DemoConfig, 'configs/demo/fast.yaml'); "
            "print(s.pretrain_optim(1e-3).steps, s.finetune_loss(0.1).mix_weight_schedule, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["7", "inverse_epoch", "False"]
