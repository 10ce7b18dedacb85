"""Every bad-input case of the ingestion issue, end to end through `python -m pipeline run`
against a real HTTP server on 127.0.0.1 and real img2dataset: each becomes a counted reason,
and input_rows == written + failed + filtered + duplicates. Expected counts are by hand."""
from __future__ import annotations

import csv
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo.http_server import LoopbackServer
from tests.harness.ingest_helpers import (ROOT, BadWebHandler, free_port, read_all_samples, run_pipeline,
                                  run_pipeline_raw)

pytestmark = pytest.mark.slow
GOOD = 10  # /img/0.jpg .. /img/9.jpg


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    parts = tmp / "urls"
    parts.mkdir()
    with LoopbackServer(handler=BadWebHandler) as server:
        u = server.url
        refused = f"http://127.0.0.1:{free_port()}/x.jpg"  # nothing listens there
        # Part 0, parquet: the good images, URL duplicates, same bytes under two URLs, HTTP failures.
        rows = [(u(f"img/{i}.jpg"), f"good image number {i}") for i in range(GOOD)]
        rows += [(u("img/0.jpg"), "the same url again"), (u("img/0.jpg"), "and once more")]
        rows += [(u("same/a.jpg"), "same bytes, first url"), (u("same/b.jpg"), "same bytes, second url")]
        rows += [(u("404.jpg"), "a missing image"), (u("500.jpg"), "a server error"), (refused, "nobody home"),
                 (u("stall.jpg"), "a stalled server"), (u("html.jpg"), "html served as jpg"),
                 (u("truncated.jpg"), "a truncated jpeg"), (u("bomb.png"), "a decompression bomb"),
                 (u("empty.jpg"), "a zero byte body")]
        rows += [(None, "a row with no url"), ("", "a row with an empty url")]
        pq.write_table(pa.table({"URL": [r[0] for r in rows], "TEXT": [r[1] for r in rows]}),
                       parts / "part0.parquet")
        # Part 1, CSV: a 1 MB caption, invalid UTF-8, control characters, caption rules.
        with open(parts / "part1.csv", "wb") as f:
            f.write(b"URL,TEXT\n")
            f.write(f'{u("img/100.jpg")},"{"x" * 1_000_000}"\n'.encode())
            f.write(u("img/101.jpg").encode() + b',"bad \xff\xfe utf8 caption"\n')
            f.write(u("img/102.jpg").encode() + b',"a\x01 photo\x07 of\ta\x0b cat"\n')
            f.write(f'{u("img/103.jpg")},"https://example.com/a.png http://x.org"\n'.encode())
            f.write(f'{u("img/104.jpg")},"!!! ??? ..."\n'.encode())
            f.write(f'{u("img/105.jpg")},""\n'.encode())
        # Part 2, JSONL: a missing url key and a valid row.
        with open(parts / "part2.jsonl", "w") as f:
            f.write(json.dumps({"TEXT": "no url key at all"}) + "\n")
            f.write(json.dumps({"URL": u("img/106.jpg"), "TEXT": "a jsonl row"}) + "\n")
        out = tmp / "out"
        proc = run_pipeline("run", "--urls", str(parts), "--out", str(out), "input.url_col=URL",
                            "input.caption_col=TEXT", "download.timeout=2", "download.image_size=32",
                            "dedup.partitions=3", "reshard.samples_per_shard=4", "reshard.val_fraction=0.2",
                            "captions.max_chars=1000")
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "summary": summary, "stdout": proc.stdout, "n_rows": len(rows) + 6 + 2}


def test_every_row_is_accounted_for(bad_run):
    s = bad_run["summary"]
    assert s["input_rows"] == bad_run["n_rows"] == 32
    total = s["written"] + sum(s["failed"].values()) + sum(s["filtered"].values()) + s["duplicates"]
    assert total == s["input_rows"]


def test_failure_reasons_are_counted(bad_run):
    assert bad_run["summary"]["failed"] == {
        "http_404": 1, "http_500": 1, "connection_refused": 1, "timeout": 1,
        "decode_error": 2,  # html served as jpg, truncated jpeg
        "too_many_pixels": 1,  # the decompression bomb, refused before decoding
        "empty_body": 1,
    }


def test_filter_reasons_are_counted(bad_run):
    assert bad_run["summary"]["filtered"] == {
        "url_missing": 3,  # None, "", and the JSONL row without the key
        "caption_too_long": 1, "caption_invalid_utf8": 1, "caption_only_urls": 1,
        "caption_only_symbols": 1, "caption_empty": 1,
    }
    assert bad_run["summary"]["repaired"] == {"caption_control_chars_stripped": 1}


def test_duplicates_by_url_and_content(bad_run):
    s = bad_run["summary"]
    assert s["duplicates_by"] == {"url": 2, "content": 1}
    assert s["duplicates"] == 3


def test_shards_hold_exactly_the_survivors(bad_run):
    samples = read_all_samples(bad_run["out"])
    s = bad_run["summary"]
    assert {k: len(v) for k, v in samples.items()} == s["written_by_split"]
    everything = [x for v in samples.values() for x in v]
    keys = [x["__key__"] for x in everything]
    assert len(keys) == len(set(keys)) == s["written"] == GOOD + 1 + 2  # + same/a + control-char row + jsonl row
    by_caption = {x["txt"].decode(): x for x in everything}
    # The URL-duplicate rows lose to the first occurrence (smallest key); same bytes keep the first URL.
    assert "good image number 0" in by_caption and "the same url again" not in by_caption
    assert "same bytes, first url" in by_caption and "same bytes, second url" not in by_caption
    assert "a photo of a cat" in by_caption  # control characters stripped, whitespace normalised
    meta = json.loads(by_caption["good image number 3"]["json"])
    assert meta["url"].endswith("/img/3.jpg") and meta["original_width"] == 48 and meta["width"] == 32
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(by_caption["good image number 3"]["jpg"])).size == (32, 32)


def test_manifest_counts_match_shards(bad_run):
    from common.shard_folder import read_manifest

    manifest = read_manifest(bad_run["out"])
    samples = read_all_samples(bad_run["out"])
    for split, info in manifest.splits.items():
        assert info.num_samples == len(samples[split])
        assert all(s.num_samples <= 4 for s in info.shards)
    assert "failed: http_404" in bad_run["stdout"]  # the final summary table is printed


# ---- user errors: one line on stderr (nothing else, not even a progress bar), exit 2, no traceback ----

def _one_line_error(proc: subprocess.CompletedProcess, expected: str, case: str) -> None:
    # make's own "make[N]: *** ... Error 2" line aside (N > 0 under `make test`)
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, (case, proc.stderr)
    assert len(lines) == 1 and expected in lines[0], (case, proc.stderr)
    assert lines[0].startswith(("error: ", "config error: ")), (case, lines)


def test_pipeline_user_errors_are_one_line(tmp_path):
    urls, other = tmp_path / "urls.csv", tmp_path / "other.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a caption\n")
    other.write_text("url,caption\nhttp://127.0.0.1:9/b.jpg,another\n")
    started = tmp_path / "started"
    run_pipeline("parts", "--urls", str(urls), "--out", str(started))    # registers 1 part, downloads nothing
    run_args = ["run", "--urls", str(urls), "--out"]
    cases = {  # argv -> what the one line must name
        "missing url file": (["run", "--urls", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "a")],
                             "no such file"),
        "bad key": ([*run_args, str(tmp_path / "b"), "dedup.partition=3"], "dedup.partition"),
        "wrong type": ([*run_args, str(tmp_path / "c"), "dedup.partitions=three"], "dedup.partitions"),
        "unknown input format": ([*run_args, str(tmp_path / "d"), "input.format=xls"], "input.format"),
        "unknown image format": ([*run_args, str(tmp_path / "e"), "download.encode_format=bmp"], "encode_format"),
        "missing column": ([*run_args, str(tmp_path / "f"), "input.url_col=link"], "missing column(s) ['link']"),
        "rerun with changed settings": (["parts", "--urls", str(urls), "--out", str(started), "dedup.partitions=3"],
                                        "dedup.partitions was 16, now 3"),
        "rerun with other input files": (["parts", "--urls", str(other), "--out", str(started)],
                                         "input files changed"),
        "stage on a folder never started": (["reshard", "--out", str(tmp_path / "g")], "not a started"),
        "reshard before dedup": (["reshard", "--out", str(started)], "dedup partitions not finished"),
        "array index out of range": (["part", "--out", str(started), "--index", "1"], "--index 1 is out of range"),
        "--out is a file": ([*run_args, str(urls)], "is a file"),
    }
    with ThreadPoolExecutor(3) as pool:    # ~3 s of imports each: run them side by side
        results = dict(zip(cases, pool.map(lambda c: run_pipeline_raw(*c[0]), cases.values())))
    for case, proc in results.items():
        _one_line_error(proc, cases[case][1], case)
    assert not (tmp_path / "g").exists() and not (tmp_path / "a").exists()    # a refused command leaves no folder
    # Before any part is normalised, the fix goes into the same OUT (no "settings changed" refusal).
    run_pipeline("parts", "--urls", str(urls), "--out", str(tmp_path / "f"), "input.url_col=url")
    # make shards passes the line through (make's own "Error 2" line aside).
    done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "shards",
                           f"URLS={tmp_path}/nope.csv", f"OUT={tmp_path}/h"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    _one_line_error(done, "no such file", "make shards")


def test_stages_out_of_order_say_what_to_run_first(tmp_path):
    """After only `parts`, every later stage names the stage to run first (one line, exit 2); a
    --partition outside 0..P-1 names the range; a run that writes 0 samples is an error line naming
    the top reason (exit 2), with summary.json kept."""
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a caption\n")    # nothing listens on port 9
    started = str(tmp_path / "started")
    run_pipeline("parts", "--urls", str(urls), "--out", started)
    cases = {
        "finalize after parts": (["finalize", "--out", started], "run `python -m pipeline part --index I`"),
        "global after parts": (["global", "--out", started], "run `python -m pipeline part --index I`"),
        "dedup after parts": (["dedup", "--out", started], "run `python -m pipeline part --index I`"),
        "url pass before part": (["dedup", "--out", started, "--pass", "url", "--partition", "0"],
                                 "run `python -m pipeline part --index I`"),
        "content pass before url pass": (["dedup", "--out", started, "--pass", "content", "--partition", "0"],
                                         "run `python -m pipeline dedup --pass url --partition P`"),
        "dedup partition too big": (["dedup", "--out", started, "--pass", "url", "--partition", "99"],
                                    "--partition 99 is out of range: dedup.partitions is 16, so 0..15"),
        "dedup partition negative": (["dedup", "--out", started, "--pass", "content", "--partition", "-1"],
                                     "0..15"),
        "dedup partition without pass": (["dedup", "--out", started, "--partition", "3"], "needs --pass"),
        "reshard partition too big": (["reshard", "--out", started, "--partition", "16"], "0..15"),
        "image_size 0": (["run", "--urls", str(urls), "--out", str(tmp_path / "a"), "download.image_size=0"],
                         "download.image_size must be >= 1, got 0"),
        "malformed override": (["run", "--urls", str(urls), "--out", str(tmp_path / "b"), "input.columns=[url"],
                               "override 'input.columns=[url': cannot parse"),
        "section set to a scalar": (["run", "--urls", str(urls), "--out", str(tmp_path / "c"), "download=3"],
                                    "bad config key 'download'"),
        "serve a missing folder": (["serve", str(tmp_path / "nope")], "no such folder"),
    }
    with ThreadPoolExecutor(3) as pool:
        empty = pool.submit(run_pipeline_raw, "run", "--urls", str(urls), "--out", str(tmp_path / "empty"),
                            "download.timeout=2")
        results = dict(zip(cases, pool.map(lambda c: run_pipeline_raw(*c[0]), cases.values())))
        empty = empty.result()
    for case, proc in results.items():
        _one_line_error(proc, cases[case][1], case)
        assert proc.returncode == 2, (case, proc.returncode)
    # The empty run logs its stages on stderr; its last line is the error.
    last = empty.stderr.strip().splitlines()[-1]
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr
    assert last.startswith("error: ") and "0 samples written, the dataset is unusable; top reason failed: " \
        "connection_refused (1 of 1 rows)" in last, last
    summary = json.loads((tmp_path / "empty" / "summary.json").read_text())
    assert summary["written"] == 0 and summary["failed"] == {"connection_refused": 1}
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
