"""Ingestion config: one dataclass per stage, each field documented. Load with
``common.config_loader.load_config(IngestConfig, yaml, overrides)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from common.config_loader import ConfigError


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
    each after max(Retry-After, backoff_seconds * 2**attempt) seconds. Done by our fetch front,
    not by img2dataset (whose retries go out back to back and ignore Retry-After)."""
    retry_after_cap: float = 60.0
    """Longest wait (s) a Retry-After may ask for. A host asking for more is not asked again (the
    row fails as http_429 / http_503), and the host's other rows fail fast until that time."""
    backoff_seconds: float = 1.0
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
    max_aspect_ratio: float = math.inf
    """Images with long/short side above this are filtered (image_aspect_ratio)."""


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
    workers: int = 2
    """Processes for the filter, dedup and reshard stages."""

    def validate(self) -> None:
        if not 0.0 <= self.reshard.val_fraction <= 1.0:
            raise ConfigError(f"reshard.val_fraction must be in [0, 1], got {self.reshard.val_fraction}")
        if self.dedup.partitions < 1 or self.dedup.partitions > 4096:
            raise ConfigError(f"dedup.partitions must be in [1, 4096], got {self.dedup.partitions}")
        if self.reshard.samples_per_shard < 1:
            raise ConfigError("reshard.samples_per_shard must be >= 1")
        choices = {
            "input.format": (self.input.format, ("auto", "parquet", "csv", "tsv", "jsonl")),
            "download.resize_mode": (self.download.resize_mode,
                                     ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")),
            "download.encode_format": (self.download.encode_format, ("jpg", "png", "webp")),
            "download.compute_hash": (self.download.compute_hash, ("sha256",)),  # dedup reads sha256
            "download.distributor": (self.download.distributor, ("multiprocessing", "pyspark", "ray")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {'|'.join(allowed)}, got '{value}'")
        d = self.download
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
        self._check_bounds()
        r = self.reshard
        for key, name in (("reshard.train_split", r.train_split), ("reshard.val_split", r.val_split)):
            if not name.strip() or "/" in name or name != name.strip():
                raise ConfigError(f"{key} must be a non-empty folder name without '/' or spaces, got '{name}'")
        if r.train_split == r.val_split:
            raise ConfigError(f"reshard.train_split and reshard.val_split must differ, both are '{r.train_split}'")

    def _check_bounds(self) -> None:
        """Numbers no one can mean: each would make every row fail (image_size=0 turned all rows
        into other_error) or crash a stage later. One line naming the key."""
        d, c, im = self.download, self.captions, self.images
        bounds = [  # (key, value, lowest allowed, strict: value must be above it)
            ("workers", self.workers, 1, False),
            ("input.csv_block_bytes", self.input.csv_block_bytes, 1, False),
            ("captions.min_chars", c.min_chars, 0, False),
            ("captions.max_chars", c.max_chars, max(c.min_chars, 1), False),
            ("download.image_size", d.image_size, 1, False),
            ("download.processes_count", d.processes_count, 1, False),
            ("download.thread_count", d.thread_count, 1, False),
            ("download.timeout", d.timeout, 0, True),
            ("download.retries", d.retries, 0, False),
            ("download.retry_after_cap", d.retry_after_cap, 0, False),
            ("download.backoff_seconds", d.backoff_seconds, 0, False),
            ("download.number_sample_per_shard", d.number_sample_per_shard, 1, False),
            ("download.max_decode_pixels", d.max_decode_pixels, 0, True),
            ("images.min_side", im.min_side, 0, False),
            ("images.max_aspect_ratio", im.max_aspect_ratio, 1, False),
            ("reshard.seed", self.reshard.seed, 0, False),  # numpy's seed sequence takes no negative entry
        ]
        for key, value, low, strict in bounds:
            if math.isnan(value) or (value <= low if strict else value < low):
                rule = f"> {low}" if strict else f">= {low}"
                if key == "captions.max_chars" and low > 1:
                    rule += " (captions.min_chars)"
                raise ConfigError(f"{key} must be {rule}, got {value}")
        for key, value in (("download.retry_after_cap", d.retry_after_cap), ("download.backoff_seconds",
                                                                             d.backoff_seconds)):
            if math.isinf(value):
                raise ConfigError(f"{key} must be finite, got {value}")
