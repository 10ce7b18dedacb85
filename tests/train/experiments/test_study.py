"""`python -m train.experiments.study` (make study): a micro study end to end, whose REPORT.md verdict table is
recomputed here with numpy/scipy from results.json, in the evaluator's keys, and whose saved runs are reused
or retrained as their format says. The verdict rule itself: test_claims.py; the core: test_study_core.py."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from pipeline.demo.source import FASHION_MNIST_DIR
from train.experiments import claims


def config_file(tmp_path, cfg) -> str:
    """``cfg`` as a YAML config file (the CLI's --config)."""
    import dataclasses

    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return str(path)


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
    from train.experiments.study.config import StudyConfig
    from train.experiments.study.run import Study

    cfg = StudyConfig(out=str(tmp_path / "study"), seeds=[0, 1], pretrain_size=600, val_size=100, finetune_size=200,
                      test_size=100, reference_size=200, pretrain_steps=4, pretrain_batch=32, pretrain_warmup=1,
                      pretrain_lrs=[1e-3], cyclip_lambdas=[0.25], finetune_steps=4, finetune_batch=32,
                      finetune_warmup=1, finetune_lrs=[1e-4], m2mix_weights=[0.02], grad_share_sizes=[64],
                      grid_extensions=1, probe_every=25, probe_size=32, baseline_pretrain_steps=2)
    report = Study(cfg).main()
    out = tmp_path / "study"
    record = json.loads((out / "results.json").read_text())
    text = report.read_text()
    verdicts = parse_verdicts(text)
    judged = [c for c in claims.CLAIMS if c.baseline in ("clip", "plain")]
    assert len(verdicts) == len(judged) == len(record["verdicts"])
    t = stats.t.ppf(0.975, 1)
    for claim, saved in zip(judged, record["verdicts"]):
        a = np.array([claims.value(e, claim.metric) for e in record["evals"][claim.arm]])
        b = np.array([claims.value(e, claim.metric) for e in record["evals"][claim.baseline]])
        gains = (a - b) if claim.measure.higher else (b - a)
        half = t * gains.std(ddof=1) / math.sqrt(2)
        gain, lo, hi, verdict = verdicts[(f"{claims.ARMS[claim.arm]} vs {claims.ARMS[claim.baseline]}", claim.measure.label)]
        assert gain == pytest.approx(gains.mean(), abs=5.1e-5)
        assert lo == pytest.approx(gains.mean() - half, abs=5.1e-5) and hi == pytest.approx(gains.mean() + half, abs=5.1e-5)
        assert verdict == ("shows" if lo > 0 else "reversed" if hi < 0 else "not resolved") == saved["verdict"]
        assert saved["metric"] == claim.metric and saved["gain"] == pytest.approx(gains.mean(), abs=1e-12)
    # every arm has both seeds, the test set clean + 12 corrupted copies, and the papers' metrics, in the
    # evaluator's keys
    for arm in claims.ARMS:
        evals = record["evals"][arm]
        assert len(evals) == 2 and all(sum(len(sev) for sev in e["shift"].values()) == 12 for e in evals)
        zero_shot = evals[0]["zero_shot"]
        assert zero_shot["consistency_definition"] == "knn_train" and set(zero_shot["consistency_k"]) == {"1", "3", "5", "10", "30"}
        assert {"ece_ts", "nll_ts", "temperature"} <= set(zero_shot)
        assert evals[0]["robustness"]["shifted_top1"] == pytest.approx(
            np.mean([m["top1"] for sev in evals[0]["shift"].values() for m in sev.values()]))
    # fine-tuning ran with the reference's fixed scale, which the evaluation uses; the trainer's optimizer
    assert record["evals"]["m2mix"][0]["model"]["logit_scale"] == pytest.approx(100.0)
    assert record["optim"]["pretrain"]["beta2"] == 0.98 and record["optim"]["pretrain"]["steps"] == 4
    for png in re.findall(r"\((plots/[^)]+\.png)\)", text):
        assert (out / png).is_file(), png
    # the report is a function of results.json and the saved runs: --report-only rewrites it unchanged (but
    # for the Time section's load average)
    from train.experiments.study.run import main as study_main

    before = text.split("## Time")[0]
    assert study_main(["--report-only", "--config", config_file(tmp_path, cfg)]) == 0
    assert report.read_text().split("## Time")[0] == before
    # a rerun reuses every finished run and evaluation ...
    models = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.pt")}
    evals = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/eval.json")}
    Study(cfg).main()
    assert {p: p.stat().st_mtime_ns for p in models} == models and {p: p.stat().st_mtime_ns for p in evals} == evals
    # ... and keeps the time and machine of the run that trained them
    again = json.loads((out / "results.json").read_text())
    assert again["timings_s"] == record["timings_s"] and again["machine"] == record["machine"]
    assert set(again["run_seconds"]) == {n for names in record["runs"].values() for n in names} | set(record["run_seconds"])
    # ... but retrains (and re-evaluates) a run saved in another format
    stale = out / "runs" / record["runs"]["m2mix"][1]
    info = json.loads((stale / "run.json").read_text())
    info["config"]["format"] = 1
    (stale / "run.json").write_text(json.dumps(info))
    Study(cfg).main()
    changed = {p for p in models if p.stat().st_mtime_ns != models[p]}
    assert changed == {stale / "model.pt"} and (stale / "eval.json").stat().st_mtime_ns != evals[stale / "eval.json"]
