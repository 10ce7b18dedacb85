"""Stage 1 (input) and the caption rules, on real files in every supported format."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages.captions import caption_reason, clean_caption, decode_caption
from pipeline.stages.read_input import InputError, list_input_files, normalize_part
from pipeline.settings import CaptionRules, IngestConfig

ROWS = [("http://a.test/1.jpg", "a red car"), ("http://a.test/2.jpg", "a blue bus"), ("", "no url")]


def _normalize(path: Path, tmp: Path, **input_cfg) -> tuple[dict, pa.Table]:
    cfg = IngestConfig()
    for k, v in input_cfg.items():
        setattr(cfg.input, k, v)
    counts = normalize_part(path, 0, cfg, tmp / "work")
    return counts, pq.read_table(tmp / "work" / "input" / "part-00000.parquet")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "jsonl.gz"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"link": [r[0] for r in ROWS], "alt": [r[1] for r in ROWS]}), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("link" + sep + "alt\n" + "".join(f"{u}{sep}{c}\n" for u, c in ROWS))
    else:
        text = "".join(json.dumps({"link": u, "alt": c}) + "\n" for u, c in ROWS)
        if fmt.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    counts, table = _normalize(path, tmp_path, url_col="link", caption_col="alt")
    assert counts["input_rows"] == 3 and counts["accepted"] == 2 and counts["filtered"] == {"url_missing": 1}
    assert table["row_key"].to_pylist() == ["00000000000000", "00000000000001"]
    assert table["caption"].to_pylist() == ["a red car", "a blue bus"]


def test_a_folder_of_parts_is_sorted_and_skips_markers(tmp_path):
    for name in ("b.csv", "a.parquet", "_SUCCESS", ".hidden.csv", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in list_input_files(tmp_path)] == ["a.parquet", "b.csv"]
    with pytest.raises(InputError, match="no such file"):
        list_input_files(tmp_path / "nope")


def test_malformed_csv_names_file_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("url,caption\nhttp://a.test/1.jpg,ok\nhttp://a.test/2.jpg,too,many,fields\n")
    with pytest.raises(InputError) as err:
        _normalize(path, tmp_path)
    assert "bad.csv" in str(err.value) and "Expected 2 columns" in str(err.value)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"url": "http://a.test/1.jpg", "caption": "fine"}\n{"url": oops}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: invalid JSON"):
        _normalize(path, tmp_path)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"URL": ["http://a.test/1.jpg"], "TEXT": ["x"]}), path)
    with pytest.raises(InputError, match=r"missing column\(s\) \['url', 'caption'\]; found \['URL', 'TEXT'\]"):
        _normalize(path, tmp_path)


def test_invalid_utf8_is_a_reason_in_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "u.csv"
    csv_path.write_bytes(b"url,caption\nhttp://a.test/1.jpg,caf\xe9 au lait\nhttp://a.test/2.jpg,fine caption\n")
    counts, _ = _normalize(csv_path, tmp_path / "c")
    assert counts["filtered"] == {"caption_invalid_utf8": 1} and counts["accepted"] == 1
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_bytes(b'{"url": "http://a.test/1.jpg", "caption": "caf\xe9"}\n'
                      b'{"url": "http://a.test/2.jpg", "caption": "lone \\ud800 surrogate"}\n'
                      b'{"url": "http://a.test/3.jpg", "caption": "caf\xc3\xa9 ok"}\n')
    counts, table = _normalize(jsonl, tmp_path / "j")
    assert counts["filtered"] == {"caption_invalid_utf8": 2}
    assert table["caption"].to_pylist() == ["café ok"]


def test_keep_columns_are_carried_and_reserved_names_refused(tmp_path):
    path = tmp_path / "k.parquet"
    pq.write_table(pa.table({"url": ["http://a.test/1.jpg", ""], "caption": ["a cat", "x"], "label": [3, 4]}), path)
    _, table = _normalize(path, tmp_path / "a", keep_columns=["label"])
    assert table["label"].to_pylist() == [3]
    with pytest.raises(InputError, match="clash"):
        _normalize(path, tmp_path / "b", keep_columns=["sha256"])


def test_normalize_is_idempotent(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("url,caption\nhttp://a.test/1.jpg,a cat\n")
    first, _ = _normalize(path, tmp_path)
    path.write_text("url,caption\n")  # a rerun must not re-read a finished part
    second, _ = _normalize(path, tmp_path)
    assert first == second


@pytest.mark.parametrize("raw,expected", [
    ("", "caption_empty"), ("   ", "caption_empty"), ("ab", "caption_too_short"), ("x" * 101, "caption_too_long"),
    ("https://e.com/a.png www.b.org/c", "caption_only_urls"), ("!!! --- ???", "caption_only_symbols"),
    ("a cat https://e.com/a.png", None), ("猫の写真", None), ("420", None)])
def test_caption_rules(raw, expected):
    rules = CaptionRules(min_chars=3, max_chars=100)
    assert caption_reason(clean_caption(raw)[0], rules) == expected


def test_clean_caption_strips_controls_and_reports_it():
    assert clean_caption("a\x00 b\x07\tc\n d") == ("a b c d", True)
    assert clean_caption("  plain   text ") == ("plain text", False)
    assert decode_caption(b"\xff") == (None, "caption_invalid_utf8")
    assert decode_caption("ok") == ("ok", None)
