"""Real URL lists end to end (issue 13): `python -m pipeline run` -> real img2dataset -> loopback
HTTP servers. One run covers header-less CC3M TSV with lone quotes and a BOM, a header-less CSV,
JSONL with NaN/null/Infinity, every EXIF orientation, 16-bit PNGs with their 8-bit twins, raw
non-ASCII URLs, duplicate URLs (never requested twice) and Retry-After (seconds, HTTP-date, 503,
none, always, one hour). Expected counts are by hand; pixels are checked against PIL / the twins."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.demo.http_server import LoopbackServer
from tests.harness.ingest_helpers import (RealWebHandler, assert_balanced, read_all_samples, run_pipeline, run_pipeline_raw,
                                  upright_image)

pytestmark = pytest.mark.slow
BOM = "\ufeff"
LONE_QUOTES = ['"Best of 2019 tablet stand', 'a "quoted" word and a lone " in the middle', 'ends with a quote"']


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    parts = tmp / "urls"
    parts.mkdir()
    RealWebHandler.log, RealWebHandler.hits = [], {}
    with LoopbackServer(handler=RealWebHandler) as server, LoopbackServer(handler=RealWebHandler) as slow_host:
        u = server.url
        rows = [(f"exif jpg {o}", u(f"exif/{o}.jpg")) for o in range(1, 9)]
        rows += [("exif png 6", u("exif/6.png")), ("exif webp 8", u("exif/8.webp"))]
        rows += [(f"deep {k} {b}", u(f"deep/{k}-{b}.png")) for k in ("grey", "la", "rgb", "rgba") for b in (16, 8)]
        rows += [(c, u(f"img/{i + 1}.jpg")) for i, c in enumerate(LONE_QUOTES)]
        rows += [("the first url again", u("img/1.jpg"))]  # a duplicate URL: never requested
        rows += [("raw cafe", u("u/caf\u00e9.jpg")), ("raw chinese", u("u/\u56fe\u7247.jpg")),
                 ("raw query", u("u/q.jpg?name=\u732b 1")), ("encoded cafe", u("u/caf%C3%A9.jpg"))]  # = raw cafe
        rows += [("space in host", "http://exa mple.com/\u00e9.jpg"), ("bad port", "http://h.test:99999/\u00e9")]
        rows += [(f"retry {m}", u(f"ra/{m}/1.jpg")) for m in ("secs", "date", "503", "nohdr", "always")]
        rows += [(f"an hour {i}", slow_host.url(f"long/{i}.jpg")) for i in (1, 2)]
        (parts / "a_cc3m.tsv").write_text(BOM + "".join(f"{c}\t{url}\n" for c, url in rows), encoding="utf-8")
        jsonl = ['{"url": "%s", "caption": NaN}' % u("img/30.jpg"), '{"url": null, "caption": "no url"}',
                 '{"url": "%s", "caption": Infinity}' % u("img/31.jpg"),
                 '{"url": "%s", "caption": "a jsonl row"}' % u("img/32.jpg")]
        (parts / "b.jsonl").write_text(BOM + "\n".join(jsonl) + "\n", encoding="utf-8")
        (parts / "c.csv").write_text(BOM + f'"a, quoted ""csv"" caption",{u("img/33.jpg")}\n', encoding="utf-8")
        config = tmp / "real.yaml"
        config.write_text("input:\n  columns: [caption, url]\ndownload:\n  resize_mode: no\n  encode_format: png\n  encode_quality: 1\n"
                          "  retries: 2\n  retry_after_cap: 5\n  retry_backoff_s: 0.5\n  timeout: 3\n"
                          "  processes_count: 1\n  thread_count: 8\ndedup:\n  partitions: 3\n"
                          "reshard:\n  val_fraction: 0.0\n")
        out = tmp / "out"
        run_pipeline("run", "--urls", str(parts), "--out", str(out), "--config", str(config))
    samples = {s["txt"].decode(): s for s in read_all_samples(out)["train"]}
    return {"summary": json.loads((out / "summary.json").read_text()), "samples": samples,
            "log": list(RealWebHandler.log), "hits": dict(RealWebHandler.hits), "n_rows": len(rows) + 4 + 1}


def test_every_row_is_accounted_for(real_run):
    s = real_run["summary"]
    assert_balanced(s)
    assert s["input_rows"] == real_run["n_rows"] == 40
    assert s["failed"] == {"http_429": 3}  # retry always (3 tries), two rows of the one-hour host
    assert s["filtered"] == {"url_invalid": 2, "caption_empty": 2, "url_missing": 1}
    assert s["duplicates_by"] == {"url": 2, "content": 0}
    assert s["written"] == 10 + 8 + 3 + 3 + 4 + 1 + 1 == len(real_run["samples"])


def test_duplicate_urls_are_never_requested(real_run):
    hits = real_run["hits"]
    assert hits["/img/1.jpg"] == 1 and hits["/u/caf\u00e9.jpg"] == 1
    assert "/img/30.jpg" not in hits and "/img/31.jpg" not in hits  # filtered before download


def test_tsv_and_csv_captions_are_kept_verbatim(real_run):
    samples = real_run["samples"]
    assert all(c in samples for c in LONE_QUOTES)
    assert 'a, quoted "csv" caption' in samples and "a jsonl row" in samples
    assert "nan" not in samples and "inf" not in samples and "Infinity" not in samples


def test_raw_non_ascii_urls_are_fetched_percent_encoded(real_run):
    paths = {(p, q) for _, p, q in real_run["log"]}
    assert ("/u/\u56fe\u7247.jpg", "") in paths and ("/u/q.jpg", "name=\u732b 1") in paths
    meta = json.loads(real_run["samples"]["raw cafe"]["json"])
    assert meta["url"].endswith("/u/caf%C3%A9.jpg")
    assert "encoded cafe" not in real_run["samples"]  # the same resource: a duplicate


def _times(log, path):
    return [t for t, p, _ in log if p == path]


@pytest.mark.parametrize("mode,gap", [("secs", 1.0), ("date", 1.0), ("503", 1.0), ("nohdr", 0.5)])
def test_retry_after_is_honoured(real_run, mode, gap):
    times = _times(real_run["log"], f"/ra/{mode}/1.jpg")
    assert len(times) == 2 and times[1] - times[0] >= gap, times
    assert f"retry {mode}" in real_run["samples"]


def test_retries_are_spaced_and_capped(real_run):
    times = _times(real_run["log"], "/ra/always/1.jpg")
    assert len(times) == 3 and all(b - a >= 1.0 for a, b in zip(times, times[1:])), times  # retries=2
    # 3600 s > cap: never asked again; the host's other row fails fast unless it was already in flight
    long_hits = [real_run["hits"].get(f"/long/{i}.jpg", 0) for i in (1, 2)]
    assert max(long_hits) == 1 and sum(long_hits) in (1, 2), long_hits


def _pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)


def test_every_exif_orientation_is_stored_upright(real_run):
    names = [f"exif jpg {o}" for o in range(1, 9)] + ["exif png 6", "exif webp 8"]
    for name in names:
        sample = real_run["samples"][name]
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (40, 24, 40, 24)
        assert np.abs(_pixels(sample) - upright_image()).mean() < 8, name  # JPEG loss only


def test_16_bit_pngs_equal_their_8_bit_twins(real_run):
    samples = real_run["samples"]
    for kind in ("grey", "la", "rgb", "rgba"):
        deep, twin = _pixels(samples[f"deep {kind} 16"]), _pixels(samples[f"deep {kind} 8"])
        assert np.array_equal(deep, twin), kind
    assert (_pixels(samples["deep grey 16"]) == 128).all()
    # alpha 128 over white, as img2dataset composites 8-bit: round(a/255*v + 255 - a)
    assert tuple(_pixels(samples["deep rgba 16"])[0, 0]) == (159, 191, 191)


def test_header_tsv_of_the_issue_and_resize_mode_no_on_the_command_line(tmp_path):
    RealWebHandler.log, RealWebHandler.hits = [], {}
    with LoopbackServer(handler=RealWebHandler) as server:
        lines = [f"{server.url(f'img/{i}.jpg')}\t{c}" for i, c in enumerate(LONE_QUOTES + ["the last row"])]
        path = tmp_path / "urls.tsv"
        path.write_text(BOM + "url\tcaption\n" + "\n".join(lines) + "\n", encoding="utf-8")
        out = tmp_path / "out"
        run_pipeline("run", "--urls", str(path), "--out", str(out), "download.resize_mode=no",
                     "download.processes_count=1", "dedup.partitions=2", "reshard.val_fraction=0")
    s = json.loads((out / "summary.json").read_text())
    assert_balanced(s)
    assert s["input_rows"] == s["written"] == 4
    captions = sorted(x["txt"].decode() for x in read_all_samples(out)["train"])
    assert captions == sorted(LONE_QUOTES + ["the last row"])
    from common.config_loader import load_config
    from pipeline.settings import IngestConfig

    # the saved config, which the stage commands (SLURM array tasks) read back
    assert load_config(IngestConfig, out / "_work" / "config.yaml").download.resize_mode == "no"


@pytest.mark.parametrize("case", ["missing_file", "no_header", "columns_mismatch", "bad_yaml_value",
                                  "missing_config", "debug"])
def test_user_errors_are_one_line_without_traceback(tmp_path, case):
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("a dog on a beach\thttp://a.test/1.jpg\textra field\n")
    config = tmp_path / "c.yaml"
    config.write_text("download:\n  resize_mode: maybe\n")
    args, expected = {
        "missing_file": (["--urls", str(tmp_path / "nope.tsv")], "no such file"),
        "no_header": (["--urls", str(tsv)], "input.columns"),
        "columns_mismatch": (["--urls", str(tsv), "input.columns=[caption,url]"], "names 2 columns"),
        "bad_yaml_value": (["--urls", str(tsv), "--config", str(config)], "download.resize_mode"),
        "missing_config": (["--urls", str(tsv), "--config", str(tmp_path / "none.yaml")], "not found"),
        "debug": (["--urls", str(tmp_path / "nope.tsv"), "--debug"], "no such file"),
    }[case]
    proc = run_pipeline_raw("run", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr
    assert ("Traceback" in proc.stderr) == (case == "debug"), proc.stderr
