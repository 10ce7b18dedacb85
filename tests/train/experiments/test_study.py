"""`python -m train.experiments.study` (make study): the paired verdict rule by hand, and a micro study end to end
whose REPORT.md verdict table is recomputed here with numpy/scipy from results.json."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from pipeline.demo.source import FASHION_MNIST_DIR
from train.experiments.study import report as study_report


def test_paired_verdict_by_hand():
    # gains 0.01..0.04: mean 0.025, sd 0.0129099, t(0.975, 3) = 3.182446 → half-width 0.0205431.
    p = study_report.paired([0.51, 0.52, 0.53, 0.54], [0.50, 0.50, 0.50, 0.50], higher=True)
    assert p["gain"] == pytest.approx(0.025) and p["n"] == 4
    assert p["lo"] == pytest.approx(0.025 - 0.0205431, abs=1e-6) and p["hi"] == pytest.approx(0.0455431, abs=1e-6)
    assert p["verdict"] == "shows"
    # Lower is better (ECE): the arm's higher values are a loss, the interval lies below 0.
    assert study_report.paired([0.51, 0.52, 0.53, 0.54], [0.5] * 4, higher=False)["verdict"] == "reversed"
    # Mixed signs: the interval contains 0.
    assert study_report.paired([0.52, 0.48, 0.51, 0.49], [0.5] * 4, higher=True)["verdict"] == "not resolved"


def parse_verdicts(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+? vs .+?) \| (.+?) [↑↓] \| (\S+) \| (\S+) \| ([+-]\d\.\d+) \(.*?\) \| \[([+-]\d\.\d+), "
                     r"([+-]\d\.\d+)\] \| \*\*(.+?)\*\* \|", line)
        if m:
            rows[(m.group(1), m.group(2))] = (float(m.group(5)), float(m.group(6)), float(m.group(7)), m.group(8))
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup-system)")
@pytest.mark.timeout(600)
def test_micro_study_report_matches_results_json(tmp_path):
    from train.experiments.study.run import StudyConfig, Study

    cfg = StudyConfig(out=str(tmp_path / "study"), seeds=[0, 1], pretrain_size=600, val_size=100, finetune_size=200,
                      test_size=100, reference_size=200, pretrain_steps=4, pretrain_batch=32, pretrain_warmup=1,
                      pretrain_lrs=[1e-3], cyclip_lambdas=[0.25], finetune_steps=4, finetune_batch=32,
                      finetune_warmup=1, finetune_lrs=[1e-4], m2mix_weights=[0.02], grad_share_sizes=[64])
    report = Study(cfg).main()
    record = json.loads((tmp_path / "study" / "results.json").read_text())
    text = report.read_text()
    verdicts = parse_verdicts(text)
    assert len(verdicts) == len(study_report.CLAIMS)
    t = stats.t.ppf(0.975, 1)
    for arm, base, key in study_report.CLAIMS:
        label, higher = study_report.LABEL[key]
        a = np.array([study_report.get(e, key) for e in record["evals"][arm]])
        b = np.array([study_report.get(e, key) for e in record["evals"][base]])
        gains = (a - b) if higher else (b - a)
        half = t * gains.std(ddof=1) / math.sqrt(2)
        gain, lo, hi, verdict = verdicts[(f"{study_report.ARMS[arm]} vs {study_report.ARMS[base]}", label)]
        assert gain == pytest.approx(gains.mean(), abs=5.1e-5)
        assert lo == pytest.approx(gains.mean() - half, abs=5.1e-5) and hi == pytest.approx(gains.mean() + half, abs=5.1e-5)
        assert verdict == ("shows" if lo > 0 else "reversed" if hi < 0 else "not resolved")
    # every arm has both seeds, the test set clean + 12 corrupted copies, and the papers' metrics
    for arm in study_report.ARMS:
        evals = record["evals"][arm]
        assert len(evals) == 2 and all(len(e["shift"]) == 12 for e in evals)
        clean = evals[0]["clean"]
        assert clean["consistency_definition"] == "knn_train" and set(clean["consistency_k"]) == {"1", "3", "5", "10", "30"}
        assert {"ece_ts", "nll_ts", "temperature"} <= set(clean)
    # fine-tuning ran with the reference's fixed scale, which the evaluation uses
    assert record["evals"]["m2mix"][0]["logit_scale"] == pytest.approx(100.0)
    for png in re.findall(r"\((plots/[^)]+\.png)\)", text):
        assert (tmp_path / "study" / png).is_file(), png
    # a rerun reuses every finished run and evaluation
    models = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").glob("*/model.pt")}
    Study(cfg).main()
    assert {p: p.stat().st_mtime_ns for p in models} == models
