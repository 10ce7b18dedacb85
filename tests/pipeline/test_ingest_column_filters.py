"""input.column_filters (curation rules on input columns, e.g. LAION's similarity / punsafe / pwatermark /
LANGUAGE), end to end through `python -m pipeline run` against a real HTTP server on 127.0.0.1 and real
img2dataset. Expected counts come from pandas on the input table, independently of the pipeline's code;
the server's request log shows that no rejected row's URL is ever requested."""
from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config_loader import load_config
from common.errors import ConfigError
from pipeline.demo.http_server import LoopbackServer
from pipeline.settings import IngestConfig
from pipeline.stages.read_input import InputError, normalize_part
from tests.harness.ingest_helpers import BadWebHandler, assert_balanced, run_pipeline, run_pipeline_raw

RULES = ["similarity >= 0.28", "punsafe < 0.5", "pwatermark < 0.8", "LANGUAGE == en"]
N = 40


class CountingHandler(BadWebHandler):
    """BadWebHandler that logs every requested path."""

    requests: list = []
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - stdlib name
        with CountingHandler.lock:
            CountingHandler.requests.append(self.path)
        return super().do_GET()


def laion_table(base_url: str) -> pd.DataFrame:
    """N LAION-like rows: thresholds on both sides, NaN and None values, rows failing two rules."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "URL": [f"{base_url}/img/{i}.jpg" for i in range(N)],
        "TEXT": [f"a laion style caption number {i}" for i in range(N)],
        "similarity": rng.uniform(0.2, 0.4, N).round(3),
        "punsafe": rng.uniform(0.0, 1.0, N).round(3),
        "pwatermark": rng.uniform(0.3, 1.0, N).round(3),
        "LANGUAGE": rng.choice(["en", "de", "fr"], N, p=[0.7, 0.2, 0.1]).astype(object),
    })
    df.loc[0, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.3, 0.1, 0.2, "en"]  # passes all
    df.loc[1, ["similarity", "punsafe"]] = [0.28, 0.1]           # exactly on the >= threshold: passes it
    df.loc[2, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.1, 0.9, 0.2, "en"]  # fails two rules
    df.loc[3, ["similarity", "punsafe"]] = [np.nan, 0.1]         # NaN
    df.loc[4, ["similarity", "punsafe"]] = [0.35, np.nan]        # NaN in the second rule only
    df.loc[5, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.35, 0.5, 0.2, "en"]  # on the < threshold
    df.loc[6, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.35, 0.1, 0.2, None]  # missing text
    df.loc[7, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.35, 0.1, 0.2, "EN"]  # case matters
    df.loc[8, ["similarity", "punsafe", "pwatermark", "LANGUAGE"]] = [0.35, 0.1, 0.95, "de"]  # fails two, not the first
    return df


def expected_reasons(df: pd.DataFrame, rules=RULES) -> pd.Series:
    """The reference: per row, the first rule it fails (pandas on the table), or None."""
    ops = {">=": pd.Series.ge, ">": pd.Series.gt, "<=": pd.Series.le, "<": pd.Series.lt,
           "==": pd.Series.eq, "!=": pd.Series.ne}
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)
    for rule in rules:
        col, op, value = rule.split(" ", 2)
        if pd.api.types.is_numeric_dtype(df[col]):
            value = float(value)
        ok = ops[op](df[col], value) & df[col].notna()  # missing fails every rule, != included
        reason[reason.isna() & ~ok] = f"column:{rule}"
    return reason


@pytest.fixture(scope="module")
def laion_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("laion")
    config = tmp / "laion.yaml"
    config.write_text("input:\n  url_col: URL\n  caption_col: TEXT\n  column_filters:\n" +
                      "".join(f"    - \"{r}\"\n" for r in RULES))
    CountingHandler.requests.clear()
    with LoopbackServer(handler=CountingHandler) as server:
        df = laion_table(server.base_url)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp / "laion.parquet")
        out = tmp / "out"
        proc = run_pipeline("run", "--urls", str(tmp / "laion.parquet"), "--out", str(out), "--config", str(config),
                            "download.image_size=32", "dedup.partitions=2", "reshard.val_fraction=0",
                            "download.processes_count=1", "download.thread_count=4", "num_workers=1")
        requested = list(CountingHandler.requests)
    return {"df": df, "out": out, "summary": json.loads((out / "summary.json").read_text()),
            "requested": requested, "stdout": proc.stdout, "tmp": tmp, "config": config}


@pytest.mark.slow
def test_counts_per_rule_match_pandas(laion_run):
    s, df = laion_run["summary"], laion_run["df"]
    reasons = expected_reasons(df)
    expected = {f"column:{r}": int((reasons == f"column:{r}").sum()) for r in RULES}
    assert all(n > 0 for n in expected.values()), expected  # the table exercises every rule
    assert s["filtered"] == expected
    assert s["written"] == int(reasons.isna().sum()) and s["failed"] == {} and s["duplicates"] == 0
    assert_balanced(s)
    assert "filtered: column:punsafe < 0.5" in laion_run["stdout"]  # the final table names each rule


@pytest.mark.slow
def test_first_failing_rule_nan_and_missing_values(laion_run):
    rejected = pq.read_table(laion_run["out"] / "_work" / "input" / "part-00000.rejected.parquet").to_pandas()
    by_row = dict(zip(rejected["row_key"].map(lambda k: int(k[5:])), rejected["reason"]))
    assert by_row[2] == "column:similarity >= 0.28"   # fails similarity and punsafe: counted under the first
    assert by_row[8] == "column:pwatermark < 0.8"     # fails pwatermark and LANGUAGE
    assert by_row[3] == "column:similarity >= 0.28"   # NaN similarity
    assert by_row[4] == "column:punsafe < 0.5"        # NaN punsafe
    assert by_row[5] == "column:punsafe < 0.5"        # 0.5 is not < 0.5
    assert by_row[6] == by_row[7] == "column:LANGUAGE == en"  # None; "EN" (exact text)
    assert 0 not in by_row and 1 not in by_row        # 0.28 >= 0.28
    assert by_row == {i: r for i, r in expected_reasons(laion_run["df"]).items() if r is not None}


@pytest.mark.slow
def test_rejected_urls_are_never_requested(laion_run):
    df, reasons = laion_run["df"], expected_reasons(laion_run["df"])
    base = df["URL"][0].rsplit("/img/", 1)[0]
    requested = {p.split("?")[0] for p in laion_run["requested"]}
    kept = {u[len(base):] for u in df["URL"][reasons.isna()]}
    rejected = {u[len(base):] for u in df["URL"][reasons.notna()]}
    assert requested == kept and not requested & rejected
    assert len(laion_run["requested"]) == len(kept)  # one request per kept row, none more


@pytest.mark.slow
def test_user_errors_are_one_line_before_any_download(laion_run):
    tmp, src = laion_run["tmp"], str(laion_run["tmp"] / "laion.parquet")
    n_requests = len(CountingHandler.requests)
    common = ["input.url_col=URL", "input.caption_col=TEXT"]
    cases = {  # override -> what the one line must name
        "absent column": ("input.column_filters=[similarity >= 0.28,aesthetic > 5]",
                          "names column 'aesthetic', which this input does not have; its columns are ['URL', "
                          "'TEXT', 'similarity', 'punsafe', 'pwatermark', 'LANGUAGE']"),
        "malformed operator": ("input.column_filters=[similarity >>= 1]", "malformed rule 'similarity >>= 1'"),
        "text on a number column": ("input.column_filters=[similarity == high]", "compares column 'similarity'"),
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(
            lambda kv: run_pipeline_raw("run", "--urls", src, "--out", str(tmp / kv[0].replace(" ", "_")),
                                        *common, kv[1][0]), cases.items())))
    for case, proc in procs.items():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, (case, proc.stderr)
        assert len(lines) == 1 and cases[case][1] in lines[0], (case, proc.stderr)
        assert lines[0].startswith(("error: ", "config error: ")), (case, lines)
        assert not (tmp / case.replace(" ", "_") / "_work" / "download").exists(), case
    assert len(CountingHandler.requests) == n_requests  # nothing was fetched (the server is closed anyway)


# ---- in-process: the input stage alone, on the other formats -------------------------------------------

def _normalize(path: Path, tmp: Path, rules, **input_cfg) -> tuple[dict, pd.DataFrame]:
    overrides = [f"input.{k}={v}" for k, v in input_cfg.items()]
    cfg = load_config(IngestConfig, None, [*overrides, "input.column_filters=[" + ",".join(rules) + "]"])
    counts = normalize_part(path, 0, cfg, tmp / "work")
    rejected = pq.read_table(tmp / "work" / "input" / "part-00000.rejected.parquet").to_pandas()
    return counts, rejected


def test_csv_and_jsonl_match_pandas_with_stray_values(tmp_path):
    rules = ["score >= 2", "lang != de", "width == 512"]
    df = pd.DataFrame({"url": [f"http://a.test/{i}.jpg" for i in range(9)], "caption": ["a photo"] * 9,
                       "score": [1, 2, 3, np.nan, 5, 6, 7, 8, 9],
                       "lang": ["en", "en", "de", "en", None, "fr", "en", "en", "en"],
                       "width": [512, 512, 512, 512, 512, 512, 256, 512, 512.0]})
    reasons = expected_reasons(df, rules)
    expected = {f"column:{r}": int((reasons == f"column:{r}").sum()) for r in rules}
    df.to_csv(tmp_path / "t.csv", index=False)  # NaN/None become empty cells
    with open(tmp_path / "t.jsonl", "w") as f:
        for row in df.to_dict("records"):
            row = {k: v for k, v in row.items() if not (k == "lang" and v is None)}  # an absent key
            f.write(json.dumps(row) + "\n")  # the NaN score is written as NaN
    for name in ("t.csv", "t.jsonl"):
        counts, rejected = _normalize(tmp_path / name, tmp_path / f"w_{name}", rules)
        assert counts["filtered"] == expected and counts["accepted"] == int(reasons.isna().sum()), name
        assert sorted(rejected["row_key"].map(lambda k: int(k[5:]))) == list(np.flatnonzero(reasons.notna()))
    # a stray word in a numeric CSV column is a missing value there, not a crash
    (tmp_path / "s.csv").write_text("url,caption,score\nhttp://a.test/1.jpg,a cat,3\n"
                                    "http://a.test/2.jpg,a dog,n/a\nhttp://a.test/3.jpg,a cow,1\n")
    counts, _ = _normalize(tmp_path / "s.csv", tmp_path / "s", ["score >= 2"])
    assert counts["filtered"] == {"column:score >= 2": 2} and counts["accepted"] == 1


def test_rule_syntax_and_config_errors(tmp_path):
    cfg = load_config(IngestConfig, None, ["input.column_filters=[similarity>=0.28, LANGUAGE == en, x != \"1\"]"])
    assert cfg.input.column_filters == ["similarity>=0.28", "LANGUAGE == en", 'x != "1"']
    for rules, message in [("[similarity >>= 1]", "malformed rule"), ("[punsafe < high]", "needs a finite number"),
                           ("[== 3]", "malformed rule"), ("[a <]", "malformed rule"),
                           ("[a >= 1, a>=1]", "given twice")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(IngestConfig, None, [f"input.column_filters={rules}"])
    with pytest.raises(ConfigError, match=r"names column\(s\) \['score'\] that input.columns"):
        load_config(IngestConfig, None, ["input.columns=[caption,url]", "input.column_filters=[score > 1]"])
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"url": "http://a.test/1.jpg", "caption": "a cat", "lang": "en"}) + "\n")
    with pytest.raises(InputError, match=r"names column 'LANG'.*its columns are \['url', 'caption', 'lang'\]"):
        _normalize(path, tmp_path, ["LANG == en"])
