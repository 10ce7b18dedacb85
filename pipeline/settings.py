"""Ingestion config: one dataclass per stage, each field documented. Load with
``common.config_loader.load_config(IngestConfig, yaml, overrides)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

from common.errors import ConfigError
from common.validation import Choice, Range, Rule, check_bounds
from pipeline.stages.columns import parse_rules, rule_columns


@dataclass
class InputConfig:
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    format: str = "auto"
    """parquet | csv | tsv | jsonl | auto (from the file extension). Quoting: csv follows RFC 4180
    (a field that starts with a double quote runs to the closing quote, newlines included; "" is a
    literal quote); tsv has no quoting at all (every physical line is a row, quotes are kept
    verbatim), as in CC3M / CC12M and the IANA text/tab-separated-values type."""
    tsv_quoting: bool = False
    """True: tsv follows the csv quoting rule too (what pandas' to_csv(sep="\\t") writes when a field
    holds a tab, newline or quote). Off by default: CC3M/CC12M-style TSVs are not quoted."""
    columns: Optional[List[str]] = None
    """Names of the columns of a csv/tsv file WITHOUT a header row, in file order: CC3M's
    Train_GCC-training.tsv is [caption, url], CC12M's cc12m.tsv is [url, caption]. None: the first
    line is the header."""
    keep_columns: List[str] = field(default_factory=list)
    """Extra input columns carried into each sample's .json (e.g. a license or a class label)."""
    csv_block_bytes: int = 64 << 20
    """pyarrow CSV block size; a single field (a huge caption) must fit in one block."""
    column_filters: List[str] = field(default_factory=list)
    """Curation rules on input columns, run before download (a rejected row costs no request), each
    ``COLUMN OP VALUE`` with OP one of >= > <= < == !=, e.g. ["similarity >= 0.28", "punsafe < 0.5",
    "LANGUAGE == en"]; on the command line input.column_filters='[similarity >= 0.28,LANGUAGE == en]'.
    >= > <= < need a number; == != compare numbers when the value is a number, else exact text (quote
    the value to force text). A missing value (null, NaN, absent JSON key, empty text, a non-number
    for >= > <= <) fails every rule, != included. The columns are read even if not kept; one absent
    from the input is an error before any download. A row is counted once, in summary.json's
    filtered as "column:<rule>", under the first rule it fails (pipeline/stages/columns.py)."""


@dataclass
class CaptionRules:
    """Caption rules run before download, so a rejected row costs no bandwidth."""

    min_chars: int = 1
    """Shorter captions (after whitespace normalisation) are filtered as caption_too_short;
    empty ones as caption_empty."""
    max_chars: int = 2000
    """Longer captions are filtered as caption_too_long (LAION captions are < 1000 chars)."""
    reject_only_symbols: bool = True
    """Filter captions with no letter or digit (caption_only_symbols)."""
    reject_only_urls: bool = True
    """Filter captions that are nothing but URLs (caption_only_urls)."""


@dataclass
class DownloadConfig:
    """Knobs passed through to img2dataset.download (see its docs)."""

    image_size: int = 256
    resize_mode: str = "border"
    """no | border | keep_ratio | keep_ratio_largest | center_crop."""
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: Optional[int] = None
    """JPEG/WebP quality (0-100) or PNG compression level (0-9); empty = the format's default
    (95 for jpg and webp, 1 for png: OpenCV's own PNG default)."""
    processes_count: int = 2
    thread_count: int = 16
    timeout: int = 10
    """Seconds before a stalled request counts as failed (reason: timeout)."""
    retries: int = 0
    """Retries of a retryable failure (HTTP 408/429/500/502/503/504, timeout, reset connection),
    each after max(Retry-After, retry_backoff_s * 2**attempt) seconds. Done by our fetch front,
    not by img2dataset (whose retries go out back to back and ignore Retry-After)."""
    retry_after_cap: float = 60.0
    """Longest wait (s) a Retry-After may ask for. A host asking for more is not asked again (the
    row fails as http_429 / http_503), and the host's other rows fail fast until that time."""
    retry_backoff_s: float = 1.0
    """First backoff step (s) when a retryable failure carries no Retry-After."""
    fetch_front: bool = True
    """Fetch through the local fetch front (pipeline.stages.fetch): Retry-After, UTF-8/IDNA URL encoding
    and image normalisation (16-bit -> 8-bit, EXIF orientation applied) before img2dataset decodes.
    False: img2dataset fetches directly (faster on a clean list, none of those fixes). The front
    listens on 127.0.0.1: with distributor=pyspark on executors of other machines, set False."""
    number_sample_per_shard: int = 10000
    """img2dataset shard size of the intermediate download folder (not the final shards)."""
    compute_hash: str = "sha256"
    """Content hash img2dataset stores per image; dedup uses it."""
    max_decode_pixels: int = 1 << 27
    """Decoded images above this many pixels are refused before allocation (OpenCV's
    CV_IO_MAX_IMAGE_PIXELS): decompression bombs fail as too_many_pixels instead of eating RAM."""
    user_agent_token: Optional[str] = None
    disallowed_header_directives: Optional[List[str]] = None
    """X-Robots-Tag directives that forbid use; None = img2dataset's default (noai, noindex, ...)."""
    distributor: str = "multiprocessing"
    """multiprocessing, or pyspark to spread one part over a Spark cluster."""

    @property
    def quality(self) -> int:
        """``encode_quality`` with the format's default filled in (what img2dataset receives)."""
        if self.encode_quality is not None:
            return self.encode_quality
        return 1 if self.encode_format == "png" else 95


@dataclass
class ImageRules:
    """Image rules run after download, on img2dataset's per-shard metadata (original sizes)."""

    min_side: int = 0
    """Images whose smaller original side is below this are filtered (image_too_small)."""
    max_aspect_ratio: Optional[float] = None
    """Images with long/short side above this (>= 1) are filtered (image_aspect_ratio); null = no limit."""


@dataclass
class DedupConfig:
    by_url: bool = True
    """Remove rows whose exact URL appeared on a row with a smaller key."""
    by_content: bool = True
    """Then remove rows whose image hash appeared on a surviving row with a smaller key."""
    partitions: int = 16
    """Hash-prefix partitions; each is deduplicated independently (memory = one partition)."""


@dataclass
class ReshardConfig:
    samples_per_shard: int = 1000
    """Final shard size. Only the last shard of each dedup partition may be smaller."""
    seed: int = 0
    """Seed of the in-partition shuffle and of nothing else (the split is by key hash)."""
    val_fraction: float = 0.05
    """Fraction of samples put in the validation split (deterministic from the key)."""
    train_split: str = "train"
    """Name of the main split (the demo's held-out test set uses 'test')."""
    val_split: str = "val"


@dataclass
class IngestConfig:
    input: InputConfig = field(default_factory=InputConfig)
    """Reading the URL lists: formats, column names, splits."""
    captions: CaptionRules = field(default_factory=CaptionRules)
    """Caption decoding, cleaning and rejection rules."""
    download: DownloadConfig = field(default_factory=DownloadConfig)
    """img2dataset settings and the fetch front."""
    images: ImageRules = field(default_factory=ImageRules)
    """Image filters applied after download (size, aspect ratio)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Duplicate removal by URL and by image content hash."""
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
    """Final shard size and the split names."""
    work_dir: Optional[str] = None
    """Intermediate stage folders; default OUT/_work. Delete after a successful run if space is short."""
    num_workers: int = 2
    """Processes for the filter, dedup and reshard stages."""

    RENAMED: ClassVar[Dict[str, str]] = {"workers": "num_workers", "download.backoff_seconds": "download.retry_backoff_s"}
    """Old dotted key -> its new name; an old key is refused in one line naming the new one."""

    BOUNDS: ClassVar[Dict[str, Rule]] = {
        "num_workers": Range(low=1), "input.csv_block_bytes": Range(low=1),
        "input.format": Choice(("auto", "parquet", "csv", "tsv", "jsonl")),
        "captions.min_chars": Range(low=0),
        "download.image_size": Range(low=1), "download.processes_count": Range(low=1),
        "download.thread_count": Range(low=1), "download.timeout": Range(low=0, low_open=True),
        "download.retries": Range(low=0), "download.retry_after_cap": Range(low=0),
        "download.retry_backoff_s": Range(low=0), "download.number_sample_per_shard": Range(low=1),
        "download.max_decode_pixels": Range(low=0, low_open=True),
        "download.resize_mode": Choice(("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")),
        "download.encode_format": Choice(("jpg", "png", "webp")),
        "download.compute_hash": Choice(("sha256",)),  # dedup reads sha256
        "download.distributor": Choice(("multiprocessing", "pyspark", "ray")),
        "images.min_side": Range(low=0), "images.max_aspect_ratio": Range(low=1),  # None = no limit
        "dedup.partitions": Range(low=1, high=4096),
        "reshard.val_fraction": Range(low=0, high=1), "reshard.samples_per_shard": Range(low=1),
        "reshard.seed": Range(low=0),  # numpy's seed sequence takes no negative entry
    }
    """Every field's rule, written once (common/validation.py; NaN/±inf are refused for every number).
    Each out-of-range value would make every row fail (image_size=0 turned all rows into other_error) or
    crash a stage later."""

    def validate(self) -> None:
        """ConfigError (one line naming the key) for a value outside its rule or an inconsistent pair."""
        check_bounds(self, self.BOUNDS)
        c, d = self.captions, self.download
        if c.max_chars < max(c.min_chars, 1):
            raise ConfigError(f"captions.max_chars must be >= {max(c.min_chars, 1)} (captions.min_chars), "
                              f"got {c.max_chars}")
        if d.encode_format == "png" and not 0 <= d.quality <= 9:
            raise ConfigError("download.encode_quality is the PNG compression level (0-9) with encode_format=png, "
                              f"got {d.encode_quality}")
        if d.encode_format != "png" and not 0 <= d.quality <= 100:
            raise ConfigError(f"download.encode_quality is the {d.encode_format} quality (0-100), got {d.encode_quality}")
        if self.input.columns is not None:
            missing = [c for c in (self.input.url_col, self.input.caption_col, *self.input.keep_columns)
                       if c not in self.input.columns]
            if missing or len(set(self.input.columns)) != len(self.input.columns):
                raise ConfigError(f"input.columns {self.input.columns} must name each column once and include "
                                  f"input.url_col / caption_col / keep_columns (missing: {missing})")
        rules = parse_rules(self.input.column_filters)  # ConfigError for a malformed rule
        if self.input.columns is not None:
            absent = [c for c in rule_columns(rules) if c not in self.input.columns]
            if absent:
                raise ConfigError(f"input.column_filters names column(s) {absent} that input.columns "
                                  f"{self.input.columns} does not have")
        r = self.reshard
        for key, name in (("reshard.train_split", r.train_split), ("reshard.val_split", r.val_split)):
            if not name.strip() or "/" in name or name != name.strip():
                raise ConfigError(f"{key} must be a non-empty folder name without '/' or spaces, got '{name}'")
        if r.train_split == r.val_split:
            raise ConfigError(f"reshard.train_split and reshard.val_split must differ, both are '{r.train_split}'")
