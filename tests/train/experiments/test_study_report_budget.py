"""The study report's attribution table (train/experiments/study/report_budget.py): which change moved which
verdict, from hand-made verdict cells whose answer is known."""
from __future__ import annotations

from train.experiments.study import report_budget


def verdict(metric, gain, status, arm="cyclip", baseline="clip"):
    return {"arm": arm, "baseline": baseline, "metric": metric, "gain": gain, "verdict": status}


def record(new_lambda, cells, previous=None):
    return {"config": {"baseline_cyclip_lambda": 0.05, "baseline_pretrain_steps": 300, "pretrain_steps": 2000},
            "chosen": {"pretrain": {"cyclip": {"lambda": new_lambda}}},
            "verdicts": [verdict("zero_shot.top1", 0.02, "shows"), verdict("zero_shot.consistency", -0.03, "reversed"),
                         verdict("embedding.alignment", 0.1, "shows", "m2mix", "plain")],
            "baseline_cells": [{"steps": 300, "lambda": lam, "verdicts": v} for lam, v in cells.items()],
            "previous": previous}


def rows_of(lines):
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[0].splitlines()[2:]]


def test_each_change_is_credited_with_the_verdict_it_turned():
    cells = {0.05: [verdict("zero_shot.top1", -0.04, "reversed"), verdict("zero_shot.consistency", -0.05, "reversed")],
             0.02: [verdict("zero_shot.top1", -0.01, "not resolved"), verdict("zero_shot.consistency", -0.04, "reversed")]}
    previous = {"design": {"pretrain_steps": 300, "cyclip_lambda": 0.05}, "source": "x",
                "verdicts": [verdict("zero_shot.top1", -0.037, "reversed")]}
    rows = rows_of(report_budget.then_and_now(record(0.02, cells, previous)))
    top1, consistency, alignment = rows
    assert top1[2:6] == ["reversed (-0.0370)", "reversed (-0.0400)", "not resolved (-0.0100)", "shows (+0.0200)"]
    assert top1[6] == "λ grid turned it (+0.0300); budget turned it (+0.0300)"
    assert consistency[6] == "λ grid kept it (+0.0100); budget kept it (+0.0100)"
    assert consistency[2] == "—"    # the earlier study had no such row
    assert alignment[3:5] == ["—", "—"] and "not separated" in alignment[6]


def test_when_the_new_lambda_is_the_old_one_only_the_budget_is_credited():
    cells = {0.05: [verdict("zero_shot.top1", -0.04, "reversed"), verdict("zero_shot.consistency", -0.05, "reversed")]}
    top1, consistency, _ = rows_of(report_budget.then_and_now(record(0.05, cells)))
    assert top1[4] == "(same λ)" and top1[6] == "budget turned it (+0.0600)"
    assert consistency[6] == "budget kept it (+0.0200)"


def test_without_earlier_budget_cells_nothing_is_credited():
    top1, _, _ = rows_of(report_budget.then_and_now(record(0.02, {})))
    assert top1[6] == "not separated (no earlier-budget cells)"
