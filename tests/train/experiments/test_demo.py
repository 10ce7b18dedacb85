"""`python -m train.experiments.demo`: the report's numbers against the eval JSON files, and its verdicts (the
paired rule of train/experiments/claims.py, tested by hand in test_claims.py) on fake runs.

The end-to-end test is `make demo FAST=1`'s command, into a temporary folder (data shared with the
repository's data/fmnist_fast when `make demo FAST=1` built it already). Every number of REPORT.md's
tables is parsed back and compared with a mean / sample standard deviation recomputed here with numpy
straight from each run's eval/eval.json (not through the report's own code).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.paths import REPO_ROOT
from train.experiments import claims
from train.experiments.demo import report as demo_report

ROOT = REPO_ROOT
# REPORT.md row label -> key path in eval.json
JSON_PATHS = {m.title: m.key for m in claims.METRICS}


def report_tables(text: str) -> dict:
    """{section title: {arm: {metric label: (mean, sd or None)}}} for the '### ' tables of REPORT.md."""
    tables, title = {}, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:].strip()
        if title and line.startswith("| metric |"):
            arms = [re.sub(r" \(n=\d+\)$", "", a.strip()) for a in line.strip("|").split("|")[1:]]
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                rows[cells[0]] = cells[1:]
            tables[title] = {arm: {label: parse_cell(cells[j]) for label, cells in rows.items()}
                             for j, arm in enumerate(arms)}
            title = None
    return tables


def parse_cell(cell: str):
    m = re.fullmatch(r"(-?\d+\.\d+)(?: ± (\d+\.\d+))?", cell)
    assert m, f"unparsable cell {cell!r}"
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


def check_against_eval_json(report: Path, arms: dict) -> int:
    """Compare every table cell with numpy over the arm's eval.json files; returns the cells checked."""
    tables = report_tables(report.read_text())
    assert set(tables) == {"Pretraining", "Fine-tuning"}, tables.keys()
    checked = 0
    for table in tables.values():
        for arm, cells in table.items():
            runs = [Path(r) for r in arms[arm]]
            evals = [json.loads((r / "eval" / "eval.json").read_text()) for r in runs]
            for label, (mean, sd) in cells.items():
                values = np.array([claims.value(e, JSON_PATHS[label]) for e in evals], dtype=np.float64)
                assert mean == pytest.approx(values.mean(), abs=5.1e-5), (arm, label)
                if len(values) > 1:
                    assert sd == pytest.approx(values.std(ddof=1), abs=5.1e-5), (arm, label)
                else:
                    assert sd is None
                checked += 1
    return checked


def fake_evals(top1s, eces):
    return [{"zero_shot": {"top1": t, "ece": e}} for t, e in zip(top1s, eces)]


def test_demo_verdicts_pair_the_seeds():
    # CyCLIP gains 0.01 on every seed of a wide spread: the paired rule shows it (an unpaired 2×SE rule would
    # not); its ECE is worse on every seed, which is no CyCLIP claim and is not judged.
    pre = {"CLIP": fake_evals([0.3, 0.6, 0.9], [0.1] * 3), "CyCLIP": fake_evals([0.31, 0.61, 0.91], [0.2] * 3)}
    fine = {"plain ← CLIP": fake_evals([0.5, 0.5, 0.5], [0.10, 0.11, 0.12]),
            "m²-Mix ← CLIP": fake_evals([0.5, 0.5, 0.5], [0.12, 0.13, 0.14])}
    items = dict(demo_report.comparisons(pre, fine))
    [top1] = items["CyCLIP vs CLIP (pretraining, same data, budget and seeds)"]
    assert (top1.claim.metric, top1.status, top1.n) == ("zero_shot.top1", "shows", 3)
    assert top1.gain == pytest.approx(0.01) and top1.lo == pytest.approx(0.01)
    by_metric = {v.claim.metric: v for v in items["m²-Mix vs plain fine-tuning, both from CLIP"]}
    assert by_metric["zero_shot.ece"].status == "reversed" and by_metric["zero_shot.top1"].status == "not resolved"
    assert "m²-Mix vs plain fine-tuning, both from CyCLIP" not in items    # arms the demo did not run
    text = "\n".join(demo_report.claims_section(pre, fine, {}))
    assert "[shows]" in text and "[reversed]" in text and "Of 3 claimed effects, 1 show" in text


def test_demo_with_one_seed_judges_nothing():
    pre = {"CLIP": fake_evals([0.5], [0.1]), "CyCLIP": fake_evals([0.6], [0.1])}
    text = "\n".join(demo_report.claims_section(pre, {}, {}))
    assert "[one seed]" in text and "no spread" in text and "none of its 1 comparisons can be judged" in text


def test_arm_table_means_and_spreads_of_fake_runs(tmp_path):
    values = {"r0": 0.25, "r1": 0.5, "r2": 0.75}
    for name, v in values.items():
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "eval.json").write_text(json.dumps(
            {"zero_shot": {"top1": v, "top5": 1.0, "ece": v / 10, "consistency": 0.5}}))
    table = demo_report.arm_table({"X": [tmp_path / n for n in values]})
    mean, sd, n = table["X"]["zero_shot.top1"]
    assert (mean, n) == (0.5, 3) and sd == pytest.approx(0.25)  # sample sd of 0.25, 0.5, 0.75
    assert "robustness.shifted_top1" not in table["X"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fast_demo_report_matches_eval_json(tmp_path):
    shared = ROOT / "data" / "fmnist_fast"
    if (shared / "manifest.json").is_file() and (ROOT / "data" / "fmnist_fast_test" / "manifest.json").is_file():
        data = [f"data={shared}"]
    else:  # a smaller set than FAST's so that building it costs well under a minute
        data = [f"data={tmp_path / 'fmnist'}", "train_per_class=100", "test_per_class=30"]
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "train.experiments.demo", "--fast", "--out", str(out), *data,
                           "eval_max_samples=300"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1/5 shards", "2-3/5 training", "4/5 evaluation", "5/5 report"):
        assert stage in proc.stdout  # every stage announces itself
    report = out / "REPORT.md"
    summary = json.loads((out / "summary.json").read_text())
    assert check_against_eval_json(report, summary["arms"]) >= 6 * 10
    text = report.read_text()
    for png in re.findall(r"\((plots/[^)]+\.png)\)", text):
        assert (out / png).is_file(), png
    assert "one seed" in text  # FAST has one seed: the report must not claim an effect
    for arm, runs in summary["arms"].items():
        for run in runs:
            ev = json.loads((Path(run) / "eval" / "eval.json").read_text())
            assert ev["dataset"]["split"] == "test" and ev["dataset"]["num_samples"] == 300
            assert len(ev["shift"]) == 4 and all(len(s) == 3 for s in ev["shift"].values())


def test_demo_captions_carry_measured_attributes():
    from pipeline.demo import source as ds

    # A 4×4 image by hand: four object pixels (> 20) of values 100, 100, 200, 200 in the top-left block.
    img = np.zeros((4, 4), np.uint8)
    img[0, :2], img[1, :2] = 100, 200
    area, brightness, texture = ds.image_attributes(img[None])[0]
    assert area == pytest.approx(4 / 16) and brightness == pytest.approx(150.0)
    # |neighbour differences| summed at object pixels: (0,1): 0 (left) ; (1,0): 100 (up); (1,1): 0 + 100;
    # (0,0): nothing → 200 / 4 pixels / brightness 150.
    assert texture == pytest.approx(200 / 4 / 150)
    # Tertiles by rank within each class, independently per class.
    values = np.array([[3.0], [1.0], [2.0], [10.0], [30.0], [20.0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert ds.tertiles_within_class(values, labels)[:, 0].tolist() == [2, 0, 1, 0, 2, 1]
    # Nine images of class 0 (t-shirt) with growing area: attribute captions name the right size word.
    imgs = np.zeros((9, 28, 28), np.uint8)
    for i in range(9):
        imgs[i, :3 + 2 * i, :10] = 128
    caps = ds.make_captions(imgs, np.zeros(9, np.int64), seed=0, class_only_share=0.0)
    nouns = ["t-shirt"] + ds.SYNONYMS["t-shirt"]
    assert all(any(n in c for n in nouns) for c in caps)
    for i, c in enumerate(caps):
        size = ds.ATTRIBUTE_WORDS["area"][i // 3]
        others = set(ds.ATTRIBUTE_WORDS["area"]) - {size}
        assert not any(f" {w} " in f" {c} " for w in others if w != "medium-sized" or size != "medium-sized"), c
    only = ds.make_captions(imgs, np.zeros(9, np.int64), seed=0, class_only_share=1.0)
    assert set(only) <= {t.format("t-shirt") for t in ds.TEMPLATES}
    div = ds.caption_diversity(caps + only, [0] * 18)
    assert div["captions"] == 18 and div["class_only_share"] == pytest.approx(0.5)
    assert div["distinct"] == len(set(caps + only))
