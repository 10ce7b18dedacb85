"""Stage 1, input: URL lists (parquet, CSV/TSV, JSONL; one file or a folder of parts) ->
normalised parts under WORK/input/. Accepted forms, per format:

    parquet      columns by name
    csv          RFC 4180: a header row, "quoted" fields may hold commas, newlines and "" (a quote)
    tsv          no quoting: one physical line = one row, quote characters kept verbatim
                 (input.tsv_quoting=true: the csv rule, for pandas-written TSVs)
    jsonl(.gz)   one object per line; null/NaN/Infinity/true/false/arrays are not text
    csv/tsv without a header row: name the columns with input.columns (CC3M: [caption, url])

A UTF-8 byte order mark at the start of any text file is ignored. URLs are percent-encoded as a
browser does (UTF-8 path and query, IDNA host); one that cannot be is filtered as url_invalid.
Output:


    part-00003.parquet       rows sent to download: row_key, url, caption, kept columns
    part-00003.rejected.parquet   rows rejected here: row_key, url, reason
    part-00003.json          counts; written last, so its presence means the part is complete

Every input row gets a row key "PPPPPRRRRRRRRR" (part, row), stable across reruns; it becomes the
final sample key. Column rules (input.column_filters, pipeline/stages/columns.py), then URL and caption
rules run here, before download, so rejected rows cost no bandwidth; a row is counted under the first
rule it fails.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import quote, urlsplit, urlunsplit

import idna
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.stages.captions import caption_reason, clean_caption, decode_caption
from pipeline.stages.columns import ColumnRule, first_failures, parse_rules, require_rule_columns, rule_columns
from common.atomic_files import atomic_path, atomic_write_text
from pipeline.settings import IngestConfig
from common.errors import InputError as UserInputError

SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
RESERVED = {"row_key", "key", "url", "caption", "status", "error_message", "width", "height",
            "original_width", "original_height", "exif", "sha256", "md5"}
_URL_OK = re.compile(r"^https?://[^\s/?#]+[^\t\n\r\f\v]*$", re.IGNORECASE)
_NEEDS_ENCODING = re.compile(r"[^\x21-\x7e]|[\"<>\\^`{|}]")  # non-ASCII, space, unsafe ASCII
_HOST_OK = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$", re.IGNORECASE)  # no empty label
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
BOM = b"\xef\xbb\xbf"
# A line inside a quoted CSV value that looks like a row of its own: an unbalanced quote swallowed it.
_SWALLOWED_ROW = re.compile(r"\n[^\n]*(https?://[^\s,]*,|,\s*https?://[^\s,]*\s*(\n|$))", re.IGNORECASE)


def normalize_url(url: str) -> Optional[str]:
    """The URL a browser would request (WHATWG URL): host to IDNA (UTS 46, then IDNA 2003 as
    browsers still accept e.g. emoji domains), path and query percent-encoded as UTF-8, existing
    %XX escapes kept, fragment dropped. An ASCII URL without spaces comes back unchanged. None
    when it cannot be encoded (bad host, bad port, whitespace other than a space)."""
    if not _URL_OK.match(url):
        return None
    if not _NEEDS_ENCODING.search(url):
        return url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port  # .port raises ValueError on a bad port
    except ValueError:
        return None
    if not host or " " in host:
        return None
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                return None
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    elif not _HOST_OK.match(host):
        return None
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None:
        userinfo = quote(parts.username, safe="%!$&'()*+,;=-._~")
        if parts.password is not None:
            userinfo += ":" + quote(parts.password, safe="%!$&'()*+,;=-._~")
        netloc = f"{userinfo}@{netloc}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_PATH_SAFE + "?")
    return urlunsplit((parts.scheme.lower(), netloc, path, query, ""))


class InputError(UserInputError):
    """A malformed input file; the message names the file and, where known, the row."""


def detect_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    suffixes = [s for s in path.suffixes if s != ".gz"]
    fmt = SUFFIXES.get(suffixes[-1].lower()) if suffixes else None
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the extension; set input.format")
    return fmt


def list_input_files(urls: str | Path) -> List[Path]:
    """One file, or every supported file in a folder (sorted: the order defines part numbers)."""
    urls = Path(urls)
    if urls.is_file():
        return [urls]
    if not urls.is_dir():
        raise InputError(f"{urls}: no such file or folder")
    files = sorted(p for p in urls.iterdir() if p.is_file() and not p.name.startswith(("_", "."))
                   and any(s.lower() in SUFFIXES for s in p.suffixes))
    if not files:
        raise InputError(f"{urls}: folder has no .parquet/.csv/.tsv/.jsonl parts")
    return files


def _require_columns(path: Path, found: List[str], needed: List[str]) -> None:
    missing = [c for c in needed if c not in found]
    if missing:
        hint = "Set input.url_col / input.caption_col / input.keep_columns."
        if any(_URL_OK.match(str(name).strip()) for name in found):  # the "header" is a data row
            hint = (f"The first line holds a URL, so the file has no header row: name its columns in order, "
                    f"e.g. input.columns=[caption,url] (CC3M) or [url,caption] (CC12M).")
        raise InputError(f"{path}: missing column(s) {missing}; found {found}. {hint}")


def _read_csv(path: Path, fmt: str, cfg: IngestConfig, needed: List[str], base: List[str],
              rules: List[ColumnRule]) -> pa.Table:
    icfg = cfg.input
    read = pacsv.ReadOptions(block_size=icfg.csv_block_bytes, column_names=icfg.columns)
    if fmt == "tsv" and not icfg.tsv_quoting:  # no quoting: a lone quote must never swallow the next lines
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, newlines_in_values=False)
    else:
        parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    if icfg.columns is None:
        with pacsv.open_csv(path, read_options=read, parse_options=parse) as probe:
            _require_columns(path, probe.schema.names, base)
            require_rule_columns(path, probe.schema.names, rules)
    types = {icfg.url_col: pa.binary(), icfg.caption_col: pa.binary()}
    # column_filters columns as text: a stray word after the first block must not stop the read
    # (pyarrow infers types from the first block); columns.py reads numbers out of the text.
    types.update({c: pa.string() for c in rule_columns(rules) if c not in base})
    try:
        return pacsv.read_csv(path, read_options=read, parse_options=parse,
                              convert_options=pacsv.ConvertOptions(include_columns=needed, column_types=types))
    except pa.ArrowInvalid as err:
        if icfg.columns is not None and "Expected" in str(err):
            raise InputError(f"{path}: input.columns names {len(icfg.columns)} columns {icfg.columns} but a row "
                             f"has another number of fields ({_one_line(err)})") from None
        raise


def read_table(path: Path, cfg: IngestConfig) -> pa.Table:
    """The url, caption, kept and column_filters columns of one input file (each once). url and caption
    stay as raw bytes where the format allows, so invalid UTF-8 becomes a per-row reason instead of a crash."""
    icfg = cfg.input
    base = [icfg.url_col, icfg.caption_col, *icfg.keep_columns]
    rules = parse_rules(icfg.column_filters)
    needed = list(dict.fromkeys([*base, *rule_columns(rules)]))
    fmt = detect_format(path, icfg.format)
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
            _require_columns(path, names, base)
            require_rule_columns(path, names, rules)
            return pq.read_table(path, columns=needed)
        if fmt in ("csv", "tsv"):
            return _read_csv(path, fmt, cfg, needed, base, rules)
        return _read_jsonl(path, needed, rules)
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as err:
        raise InputError(f"{path}: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:500]


def _json_text(value) -> Optional[bytes]:
    """A JSON value as caption/url bytes; None for what is not text (null, NaN, +-Infinity,
    booleans, arrays, objects), so it is never turned into 'nan' or 'None'."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")  # lone surrogates (bad UTF-8) fail decode_caption
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    if isinstance(value, float) and math.isfinite(value):
        return repr(value).encode()
    return None


def _read_jsonl(path: Path, needed: List[str], rules: List[ColumnRule] = ()) -> pa.Table:
    columns: Dict[str, list] = {c: [] for c in needed}
    keys_seen: Dict[str, None] = {}  # in order of first appearance, for the error naming the columns
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            if not line.strip():
                continue
            try:
                # surrogateescape keeps invalid UTF-8 visible to decode_caption as lone surrogates
                row = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if rules:
                keys_seen.update(dict.fromkeys(row))
            for c in needed:
                columns[c].append(row.get(c))
    if rules and columns[needed[0]]:  # a key no row has; one some rows lack is a missing value there
        require_rule_columns(path, list(keys_seen), rules)
    filter_only = set(rule_columns(rules))
    arrays = {}
    for c, values in columns.items():
        if c in needed[:2]:  # url, caption: bytes, so lone surrogates (bad UTF-8) fail decode_caption
            arrays[c] = pa.array([_json_text(v) for v in values], pa.binary())
        elif c in filter_only:  # mixed types (0.3 and "n/a") are compared cell by cell, as text
            try:
                arrays[c] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                arrays[c] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v)
                                      for v in values], pa.string())
        else:
            arrays[c] = pa.array(values)
    return pa.table(arrays)


def _url_and_reason(raw_url) -> tuple:
    """(the URL to fetch, None) or (the URL as read, reason)."""
    url, bad_url = decode_caption(raw_url)  # same UTF-8 check as captions
    url = url.strip() if url else None
    if bad_url:
        return url, "url_invalid"
    if not url:
        return url, "url_missing"
    encoded = normalize_url(url)
    return (url, "url_invalid") if encoded is None else (encoded, None)


def normalize_part(src: Path, part: int, cfg: IngestConfig, work: Path) -> Dict:
    """Read one input file, apply URL and caption rules, write the part files. Idempotent."""
    out_dir = work / "input"
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / f"part-{part:05d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    clash = RESERVED.intersection(cfg.input.keep_columns)
    if clash:
        raise InputError(f"input.keep_columns {sorted(clash)} clash with pipeline column names")
    table = read_table(src, cfg)
    rules = parse_rules(cfg.input.column_filters)
    column_reasons = first_failures(table, rules, src)
    fmt = detect_format(src, cfg.input.format)
    check_swallowed = fmt == "csv" or (fmt == "tsv" and cfg.input.tsv_quoting)
    urls = table.column(cfg.input.url_col).to_pylist()
    captions = table.column(cfg.input.caption_col).to_pylist()
    filtered: Counter = Counter({rule.reason: 0 for rule in rules})  # every rule shows, even at 0
    repaired: Counter = Counter()
    keep_rows, keys, clean_urls, clean_caps = [], [], [], []
    rej_keys, rej_urls, rej_reasons = [], [], []
    for i, (raw_url, raw_caption) in enumerate(zip(urls, captions)):
        key = f"{part:05d}{i:09d}"
        url, reason = _url_and_reason(raw_url)
        if column_reasons[i] is not None:
            reason = column_reasons[i]
        caption = None
        if reason is None:
            caption, reason = decode_caption(raw_caption)
        if check_swallowed and caption and "\n" in caption and _SWALLOWED_ROW.search(caption):
            raise InputError(f"{src}: data row {i + 1}: a quoted caption runs over lines that look like rows of their "
                             f"own (an unbalanced \" at the start of a field?). RFC 4180 quoting applies to csv; "
                             f"quote that field and double its quotes (\"\"), or write the list as TSV, which has no "
                             f"quoting")
        if reason is None:
            caption, had_control = clean_caption(caption or "")
            reason = caption_reason(caption, cfg.captions)
            if had_control and reason is None:
                repaired["caption_control_chars_stripped"] += 1
        if reason is not None:
            filtered[reason] += 1
            rej_keys.append(key)
            rej_urls.append(url)
            rej_reasons.append(reason)
            continue
        keep_rows.append(i)
        keys.append(key)
        clean_urls.append(url)
        clean_caps.append(caption)
    accepted = {"row_key": pa.array(keys, pa.string()), "url": pa.array(clean_urls, pa.string()),
                "caption": pa.array(clean_caps, pa.string())}
    for c in cfg.input.keep_columns:
        accepted[c] = table.column(c).take(pa.array(keep_rows, pa.int64()))
    _write_parquet(pa.table(accepted), out_dir / f"part-{part:05d}.parquet")
    _write_parquet(pa.table({"row_key": pa.array(rej_keys, pa.string()), "url": pa.array(rej_urls, pa.string()),
                             "reason": pa.array(rej_reasons, pa.string())}),
                   out_dir / f"part-{part:05d}.rejected.parquet")
    counts = {"source": str(src), "input_rows": table.num_rows, "accepted": len(keys),
              "filtered": dict(filtered), "repaired": dict(repaired)}
    atomic_write_text(marker, json.dumps(counts, indent=1))
    return counts


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
