"""Benchmark results have one home, BENCHMARKS.md: a section is replaced in place by name, the others stay."""
from __future__ import annotations

from benchmarks import run as bench_run
from common.paths import REPO_ROOT


def test_a_section_is_replaced_in_place_and_the_others_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "stamp", lambda quick=False: f"_stamp{' quick' if quick else ''}_")
    out = tmp_path / "BENCHMARKS.md"
    bench_run.write_section(out, "bench_b", "## B\n\n| b | 1 |\n")
    bench_run.write_section(out, "bench_a", "## A\n\nfirst A\n")
    expected_a = "## A\n\n_stamp_\n\nfirst A\n"
    assert out.read_text() == (bench_run.HEADER + "<!-- section: bench_a -->\n" + expected_a + "\n"
                               "<!-- section: bench_b -->\n## B\n\n_stamp_\n\n| b | 1 |\n")
    bench_run.write_section(out, "bench_b", "## B\n\n| b | 2 |\n", quick=True)    # `--only b` again
    assert bench_run.read_sections(out) == {"bench_a": expected_a, "bench_b": "## B\n\n_stamp quick_\n\n| b | 2 |\n"}


def test_the_committed_results_are_sections_and_nothing_else_holds_results():
    sections = bench_run.read_sections(REPO_ROOT / "BENCHMARKS.md")
    assert sections and all(name.startswith("bench_") and text.startswith("## ") for name, text in sections.items())
    assert (REPO_ROOT / "BENCHMARKS.md").read_text().startswith(bench_run.HEADER)
    assert not (REPO_ROOT / "benchmarks" / "results").exists()
