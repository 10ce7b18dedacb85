"""Input forms of real URL lists (issue 13), stage by stage and without a download: TSV without
quoting, header-less CC3M/CC12M files, byte order marks, JSON NaN/null/Infinity, raw non-ASCII
URLs, YAML booleans in string fields, Retry-After parsing and the image repair of the fetch front.
Each expectation is written by hand or comes from an independent reference (PIL, idna)."""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import subprocess
import sys
import typing
from email.utils import formatdate
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from common.config_loader import ConfigError, load_config
from pipeline.stages.fetch import normalize_image, retry_after_seconds
from pipeline.stages.read_input import InputError, normalize_part, normalize_url
from pipeline.settings import IngestConfig
from tests.harness.ingest_helpers import deep_png, exif_oriented, upright_image
from common.paths import REPO_ROOT

BOM = b"\xef\xbb\xbf"
ROOT = REPO_ROOT


def _normalize(path: Path, tmp: Path, **input_cfg) -> tuple[dict, pa.Table]:
    cfg = IngestConfig()
    for k, v in input_cfg.items():
        setattr(cfg.input, k, v)
    cfg.validate()
    counts = normalize_part(path, 0, cfg, tmp / "work")
    assert counts["input_rows"] == counts["accepted"] + sum(counts["filtered"].values())
    return counts, pq.read_table(tmp / "work" / "input" / "part-00000.parquet")


# ---- 1. TSV: every physical line is a row; quotes are text. CSV keeps RFC 4180 quoting.

TSV_CAPTIONS = ['"Best of 2019 tablet stand', 'a "quoted" word', 'ends with a quote"', '""doubled""',
                '"fully quoted caption"', "\u201csmart quotes\u201d and \u2018single\u2019", "it's a 'single' quote",
                'tab-free "multi', 'the last row']


@pytest.mark.parametrize("bom", [b"", BOM])
def test_tsv_lone_quotes_never_swallow_lines(tmp_path, bom):
    lines = [f"http://a.test/{i}.jpg\t{c}" for i, c in enumerate(TSV_CAPTIONS)]
    path = tmp_path / "urls.tsv"
    path.write_bytes(bom + ("url\tcaption\n" + "\n".join(lines) + "\n").encode())
    counts, table = _normalize(path, tmp_path)
    assert counts["input_rows"] == len(TSV_CAPTIONS) == table.num_rows
    assert table["caption"].to_pylist() == TSV_CAPTIONS  # verbatim
    assert table["url"].to_pylist() == [f"http://a.test/{i}.jpg" for i in range(len(TSV_CAPTIONS))]


def test_csv_keeps_rfc4180_quoting(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(BOM + b'url,caption\nhttp://a.test/1.jpg,"a, comma"\nhttp://a.test/2.jpg,"two\nlines"\n'
                     b'http://a.test/3.jpg,"say ""hi"""\nhttp://a.test/4.jpg,plain\n')
    counts, table = _normalize(path, tmp_path)
    assert table["caption"].to_pylist() == ["a, comma", "two lines", 'say "hi"', "plain"]


def test_tsv_quoting_on_request_reads_what_pandas_writes(tmp_path):
    path = tmp_path / "pandas.tsv"
    path.write_text('url\tcaption\nhttp://a.test/1.jpg\t"a\ttab"\nhttp://a.test/2.jpg\t"say ""hi""\nthere"\n')
    _, table = _normalize(path, tmp_path / "q", tsv_quoting=True)
    assert table["caption"].to_pylist() == ["a tab", 'say "hi" there']  # tab/newline -> space (clean_caption)
    with pytest.raises(InputError, match="pandas.tsv"):  # without quoting: 3 fields on line 2
        _normalize(path, tmp_path / "n")


def test_csv_with_an_unbalanced_quote_is_an_error_not_a_lost_row(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text('url,caption\nhttp://a.test/1.jpg,"Best of 2019 tablet stand\nhttp://a.test/2.jpg,next\n'
                    'http://a.test/3.jpg,last\n')
    with pytest.raises(InputError, match=r"urls\.csv: data row 1: .*unbalanced"):
        _normalize(path, tmp_path)


# ---- 7. Header-less files (CC3M, CC12M) with input.columns.

def test_cc3m_and_cc12m_headerless(tmp_path):
    cc3m = tmp_path / "Train_GCC-training.tsv"
    cc3m.write_bytes(BOM + b"a dog on a beach\thttp://a.test/1.jpg\n\"lone quote caption\thttp://a.test/2.jpg\n")
    counts, table = _normalize(cc3m, tmp_path / "a", columns=["caption", "url"])
    assert table["caption"].to_pylist() == ["a dog on a beach", '"lone quote caption']
    assert table["url"].to_pylist() == ["http://a.test/1.jpg", "http://a.test/2.jpg"]
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("http://a.test/3.jpg\t<PERSON> on stage\nhttp://a.test/4.jpg\tcaf\u00e9 au lait\n")
    _, table = _normalize(cc12m, tmp_path / "b", columns=["url", "caption"])
    assert table["caption"].to_pylist() == ["<PERSON> on stage", "caf\u00e9 au lait"]


def test_headerless_mismatch_and_missing_columns_are_one_line_errors(tmp_path):
    path = tmp_path / "three.tsv"
    path.write_text("a dog\thttp://a.test/1.jpg\textra\n")
    with pytest.raises(InputError, match=r"input\.columns names 2 columns") as err:
        _normalize(path, tmp_path / "a", columns=["caption", "url"])
    assert "\n" not in str(err.value)
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_text("a dog on a beach\thttp://a.test/1.jpg\n")
    with pytest.raises(InputError, match=r"no header row.*input\.columns=\[caption,url\]"):
        _normalize(cc3m, tmp_path / "b")  # forgot input.columns
    with pytest.raises(ConfigError, match="input.columns"):
        load_config(IngestConfig, None, ["input.columns=[text,link]"])  # url/caption not named


# ---- 5, 6. JSONL: NaN / null / Infinity are not text; a BOM is ignored (also gzipped).

@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_non_text_values_and_bom(tmp_path, gz):
    lines = ['{"url": "http://a.test/1.jpg", "caption": NaN}', '{"url": "http://a.test/2.jpg", "caption": null}',
             '{"url": "http://a.test/3.jpg", "caption": Infinity}', '{"url": "http://a.test/4.jpg", "caption": -Infinity}',
             '{"url": NaN, "caption": "nan url"}', '{"url": null, "caption": "null url"}',
             '{"url": Infinity, "caption": "inf url"}', '{"url": "http://a.test/8.jpg", "caption": true}',
             '{"url": "http://a.test/9.jpg", "caption": ["a", "list"]}',
             '{"url": "http://a.test/10.jpg", "caption": 2019}', '{"url": "http://a.test/11.jpg", "caption": "ok"}']
    data = BOM + "\n".join(lines).encode() + b"\n"
    path = tmp_path / ("u.jsonl.gz" if gz else "u.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    counts, table = _normalize(path, tmp_path)
    assert counts["filtered"] == {"caption_empty": 6, "url_missing": 3}
    assert table["caption"].to_pylist() == ["2019", "ok"]


def test_bom_in_every_text_format_reads_as_without(tmp_path):
    rows = b"http://a.test/1.jpg\tone\nhttp://a.test/2.jpg\ttwo\n"
    variants = {"t.tsv": b"url\tcaption\n" + rows, "c.csv": rows.replace(b"\t", b",").join([b"url,caption\n", b""]),
                "j.jsonl": b'{"url": "http://a.test/1.jpg", "caption": "one"}\n'
                           b'{"url": "http://a.test/2.jpg", "caption": "two"}\n'}
    for name, body in variants.items():
        results = []
        for prefix in (b"", BOM):
            (tmp_path / name).write_bytes(prefix + body)
            _, table = _normalize(tmp_path / name, tmp_path / f"{name}{len(prefix)}")
            results.append(table.to_pylist())
        assert results[0] == results[1] and [r["caption"] for r in results[0]] == ["one", "two"], name


def test_parquet_nan_caption_is_empty(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"url": ["http://a.test/1.jpg", "http://a.test/2.jpg"], "caption": [float("nan"), 1.5]}),
                   path)
    counts, table = _normalize(path, tmp_path)
    assert counts["filtered"] == {"caption_empty": 1} and table["caption"].to_pylist() == ["1.5"]


# ---- 4. Raw non-ASCII URLs: encoded as a browser does.

@pytest.mark.parametrize("raw,expected", [
    ("http://h.test/img/caf\u00e9.jpg", "http://h.test/img/caf%C3%A9.jpg"),
    ("http://h.test/\u56fe\u7247.jpg", "http://h.test/%E5%9B%BE%E7%89%87.jpg"),
    ("http://h.test/a b.jpg?q=\u732b 1&x=%41#frag", "http://h.test/a%20b.jpg?q=%E7%8C%AB%201&x=%41"),
    ("http://b\u00fccher.example/x.jpg", "http://xn--bcher-kva.example/x.jpg"),
    ("https://\u4f8b\u3048.\u30c6\u30b9\u30c8:8443/\u00e9", "https://xn--r8jz45g.xn--zckzah:8443/%C3%A9"),
    ("http://\u2603.net/x", "http://xn--n3h.net/x"),  # emoji host: IDNA 2003, as browsers accept
    ("http://h.test/already%20encoded.jpg", "http://h.test/already%20encoded.jpg"),
    ("http://h.test/a\"<b>.jpg", "http://h.test/a%22%3Cb%3E.jpg"),
    ("http://a..b/\u00e9", None), ("http://h.test:99999/\u00e9", None), ("http://exa mple.com/\u00e9", None),
    ("http://h.test/a\tb.jpg", None), ("ftp://h.test/\u00e9.jpg", None), ("http:///\u00e9.jpg", None),
])
def test_url_encoding(raw, expected):
    assert normalize_url(raw) == expected


def test_url_encoding_matches_the_idna_reference():
    import idna

    for host in ["m\u00fcnchen.de", "\u0645\u062b\u0627\u0644.\u0625\u062e\u062a\u0628\u0627\u0631", "\u0440\u0444.test"]:
        assert normalize_url(f"http://{host}/p") == f"http://{idna.encode(host, uts46=True).decode()}/p"


# ---- 8. YAML booleans (and numbers) never land in string fields, in every schema.

def _string_fields(schema, prefix=""):
    """Dotted names of every str / Optional[str] field of a dataclass schema, recursively."""
    for f in dataclasses.fields(schema):
        tp = typing.get_type_hints(schema)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            yield from _string_fields(tp, f"{prefix}{f.name}.")
        elif tp is str or (typing.get_origin(tp) is typing.Union and args == [str]):
            yield f"{prefix}{f.name}"


def _schemas():
    from train.config import TrainConfig
    from train.experiments.demo.run import DemoConfig
    from train.evaluate.config import EvalConfig
    from train.experiments.study.run import StudyConfig

    return [IngestConfig, TrainConfig, EvalConfig, DemoConfig, StudyConfig]


def _yaml_setting(keys, word) -> str:
    tree: dict = {}
    for key in keys:
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = word

    def dump(node, indent=""):
        return "".join(f"{indent}{k}:\n{dump(v, indent + '  ')}" if isinstance(v, dict) else f"{indent}{k}: {v}\n"
                       for k, v in node.items())
    return dump(tree)


@pytest.mark.parametrize("word", ["no", "off", "yes", "1.10"])
def test_every_string_field_gets_the_text_as_written(tmp_path, word):
    """All string fields of a schema set at once (YAML file, then command line). A validator may
    refuse the word for a field: its error must name that key; the field is then left out."""
    checked = 0
    for schema in _schemas():
        for source in ("yaml", "command line"):
            keys = list(_string_fields(schema))
            while keys:
                (tmp_path / "c.yaml").write_text(_yaml_setting(keys, word))
                args = {"path": tmp_path / "c.yaml"} if source == "yaml" else {"overrides": [f"{k}={word}" for k in keys]}
                try:
                    cfg = load_config(schema, **args)
                except ConfigError as err:
                    named = [k for k in keys if k.rpartition(".")[2] in str(err)]
                    assert named, (schema.__name__, source, str(err))  # the refusal names the key
                    keys.remove(max(named, key=len))
                    continue
                for key in keys:
                    value = cfg
                    for part in key.split("."):
                        value = getattr(value, part)
                    assert value == word, (schema.__name__, key, source, value)
                checked += len(keys)
                break
    assert checked > 40


def test_resize_mode_no_in_yaml_and_on_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("download:\n  resize_mode: no\ninput:\n  keep_columns: [yes, off]\n")
    cfg = load_config(IngestConfig, tmp_path / "c.yaml")
    assert cfg.download.resize_mode == "no" and cfg.input.keep_columns == ["yes", "off"]
    assert load_config(IngestConfig, None, ["download.resize_mode=no"]).download.resize_mode == "no"
    with pytest.raises(ConfigError, match="download.resize_mode"):
        load_config(IngestConfig, None, ["download.resize_mode=sideways"])
    assert load_config(IngestConfig, None, ["work_dir=null"]).work_dir is None  # null stays None


# ---- 9. Retry-After values.

def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_seconds("1", now) == 1.0 and retry_after_seconds(" 120 ", now) == 120.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now) == 0.0  # in the past: now
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5"):
        assert retry_after_seconds(bad, now) is None


# ---- 2, 3. The fetch front's image repair against PIL / the 8-bit twin.

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_exif_orientation_is_applied(fmt):
    for orientation in range(1, 9):
        body = exif_oriented(orientation, fmt)
        reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(body))).convert("RGB"))
        fixed = cv2.imdecode(np.frombuffer(normalize_image(body), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert fixed.shape == reference.shape == upright_image().shape, (fmt, orientation)
        assert np.abs(fixed.astype(int) - reference).max() <= 1, (fmt, orientation)


@pytest.mark.parametrize("kind", ["grey", "la", "rgb", "rgba"])
def test_16_bit_pngs_become_their_8_bit_twins(kind):
    fixed = cv2.imdecode(np.frombuffer(normalize_image(deep_png(kind, 16)), np.uint8), cv2.IMREAD_UNCHANGED)
    twin = cv2.imdecode(np.frombuffer(deep_png(kind, 8), np.uint8), cv2.IMREAD_UNCHANGED)
    assert fixed.dtype == np.uint8 and np.array_equal(fixed, twin)
    assert normalize_image(deep_png(kind, 8)) == deep_png(kind, 8)  # 8-bit bytes pass untouched


def test_16_bit_tiff_and_plain_jpeg():
    grey = np.full((5, 7), 0x8080, np.uint16)
    fixed = cv2.imdecode(np.frombuffer(normalize_image(cv2.imencode(".tiff", grey)[1].tobytes()), np.uint8),
                         cv2.IMREAD_UNCHANGED)
    assert fixed.dtype == np.uint8 and (fixed == 128).all()
    plain = exif_oriented(1)
    assert normalize_image(plain) == plain and normalize_image(b"<html>") == b"<html>"


def test_fetch_front_passes_robots_headers_and_reports_failures():
    """What img2dataset sees through the front: the origin's X-Robots-Tag (img2dataset applies its
    rules to it) and, for a failure, status 599 carrying the origin's error text."""
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler

    from pipeline.stages.fetch import FetchFront, FrontSettings
    from pipeline.demo.http_server import LoopbackServer

    class Origin(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            code = 404 if self.path == "/missing.jpg" else 200
            self.send_response(code)
            if code == 200:
                self.send_header("X-Robots-Tag", "otherbot: noindex")
                self.send_header("X-Robots-Tag", "noai")
            body = exif_oriented(1) if code == 200 else b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with LoopbackServer(handler=Origin) as origin, FetchFront(FrontSettings(timeout=5), processes=1) as front:
        with urllib.request.urlopen(front.url_for(origin.url("a.jpg")), timeout=10) as r:
            assert r.headers.get_all("X-Robots-Tag") == ["otherbot: noindex", "noai"]
            assert r.read() == exif_oriented(1)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(front.url_for(origin.url("missing.jpg")), timeout=10)
        assert err.value.code == 599 and str(err.value) == "HTTP Error 599: HTTP Error 404: Not Found"
    from pipeline.stages.download import classify_failure

    assert classify_failure(str(err.value)) == "http_404"


def test_rerun_with_changed_settings_is_refused_but_speed_knobs_may_change(tmp_path):
    """A work folder resumes only with its own settings: 32 px shards must not be finished at 64 px."""
    import argparse

    from pipeline.__main__ import resolve_config
    from common.config_loader import load_config as load
    from pipeline.stages.read_input import InputError
    from pipeline.settings import IngestConfig

    out = tmp_path / "out"
    first = argparse.Namespace(config=None, overrides=["download.image_size=32", "download.resize_mode=no"])
    # Before any input part is normalised nothing depends on the settings: a fix is accepted in the same OUT.
    assert resolve_config(argparse.Namespace(config=None, overrides=["download.image_size=48"]), out) \
        .download.image_size == 48
    assert resolve_config(first, out).download.image_size == 32
    # Normalise the input for real (`python -m pipeline parts`); from now on the settings are the folder's.
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a picture of a cat\n")
    done = subprocess.run([sys.executable, "-m", "pipeline", "parts", "--urls", str(urls), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    assert done.returncode == 0 and list((out / "_work" / "input").glob("part-*.json")), done.stderr
    same = argparse.Namespace(config=None, overrides=["download.image_size=32", "download.resize_mode=no",
                                                      "num_workers=1", "download.thread_count=4"])
    assert resolve_config(same, out).download.thread_count == 4
    with pytest.raises(InputError, match=r"download\.image_size was 32, now 64"):
        resolve_config(argparse.Namespace(config=None, overrides=["download.image_size=64",
                                                                  "download.resize_mode=no"]), out)
    resumed = resolve_config(argparse.Namespace(config=None, overrides=[]), out)  # no settings: the saved ones
    assert resumed.download.image_size == 32 and resumed.download.resize_mode == "no"
    assert load(IngestConfig, out / "_work" / "config.yaml").download.image_size == 32
