"""The study report's attribution table (train/experiments/study/report_budget.py): which change moved which
verdict, from hand-made verdict cells whose answer is known."""
from __future__ import annotations

from train.experiments.study import report_budget


def verdict(metric, gain, status, arm="cyclip", baseline="clip"):
    return {"arm": arm, "baseline": baseline, "metric": metric, "gain": gain, "verdict": status}


def record(new_lambda, cells, previous=None):
    return {"config": {"baseline_cyclip_lambda": 0.05, "baseline_pretrain_steps": 300, "pretrain_steps": 2000,
                       "pretrain_batch": 256},
            "chosen": {"pretrain": {"cyclip": {"lambda": new_lambda, "lr": 3e-3}}},
            "verdicts": [verdict("zero_shot.top1", 0.02, "shows"), verdict("zero_shot.consistency", -0.03, "reversed"),
                         verdict("embedding.alignment", 0.1, "shows", "m2mix", "plain")],
            "baseline_cells": [{"steps": 300, "lambda": lam, "verdicts": v, "runs": {"clip": [0, 1]},
                                "logit_scale": {"clip": [15.0, 15.0], "cyclip": [21.0, 23.0]}} for lam, v in cells.items()],
            "previous": previous}


def rows_of(lines):
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[0].splitlines()[2:]]


def test_each_change_is_credited_with_the_verdict_it_turned():
    cells = {0.05: [verdict("zero_shot.top1", -0.04, "reversed"), verdict("zero_shot.consistency", -0.05, "reversed")],
             0.02: [verdict("zero_shot.top1", -0.01, "not resolved"), verdict("zero_shot.consistency", -0.04, "reversed")]}
    previous = {"design": {"pretrain_steps": 300, "pretrain_batch": 256, "cyclip_lambda": 0.05}, "source": "x",
                "verdicts": [verdict("zero_shot.top1", -0.037, "reversed")]}
    rows = rows_of(report_budget.then_and_now(record(0.02, cells, previous)))
    top1, consistency, alignment = rows
    assert top1[2:6] == ["reversed (-0.0370)", "reversed (-0.0400)", "not resolved (-0.0100)", "shows (+0.0200)"]
    assert top1[6] == "core kept it (-0.0030); λ grid turned it (+0.0300); budget turned it (+0.0300)"
    assert consistency[6] == "λ grid kept it (+0.0100); budget kept it (+0.0100)"
    assert consistency[2] == "—"    # the earlier study had no such row
    assert alignment[3:5] == ["—", "—"] and alignment[6] == "— (no earlier verdict)"


def test_a_rerun_of_another_design_is_not_credited_to_the_code():
    cells = {0.05: [verdict("zero_shot.top1", -0.04, "reversed"), verdict("zero_shot.consistency", -0.05, "reversed")]}
    previous = {"design": {"pretrain_steps": 300, "pretrain_batch": 512, "cyclip_lambda": 0.05}, "source": "x",
                "verdicts": [verdict("zero_shot.top1", -0.037, "not resolved")]}
    lines = report_budget.then_and_now(record(0.05, cells, previous))
    top1 = rows_of(lines)[0]
    assert top1[-1] == "budget turned it (+0.0600)"    # no "core" step: the rerun is not the earlier design
    assert any("pretrain_batch 256 vs 512" in line and "not** the earlier study's design" in line for line in lines)


def test_when_the_new_lambda_is_the_old_one_only_the_budget_is_credited():
    cells = {0.05: [verdict("zero_shot.top1", -0.04, "reversed"), verdict("zero_shot.consistency", -0.05, "reversed")]}
    top1, consistency, alignment = rows_of(report_budget.then_and_now(record(0.05, cells)))
    # no earlier study and one earlier-budget column: comparison, claim, rerun, new, what moved it
    assert len(top1) == 5 and top1[2:] == ["reversed (-0.0400)", "shows (+0.0200)", "budget turned it (+0.0600)"]
    assert consistency[4] == "budget kept it (+0.0200)"
    assert alignment[2] == "—" and alignment[4] == "— (no earlier verdict)"


def test_without_earlier_budget_cells_nothing_is_credited():
    top1, _, _ = rows_of(report_budget.then_and_now(record(0.02, {})))
    assert len(top1) == 4 and top1[3] == "not separated (no earlier-budget cells)"


def test_the_earlier_verdicts_file_is_read_at_the_start(tmp_path):
    import pytest

    from common.errors import UserError
    from train.experiments.study.run import load_previous

    logged = []
    assert load_previous("") is None
    assert load_previous(str(tmp_path / "missing.json"), logged.append) is None and "does not exist" in logged[0]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a verdicts file"):
        load_previous(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="no verdicts list"):
        load_previous(str(tmp_path / "list.json"))
    committed = load_previous("study/verdicts_300_steps.json")    # the committed file, relative to the repo
    assert committed["design"]["pretrain_steps"] == 300 and len(committed["verdicts"]) == 11
