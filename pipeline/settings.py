"""Ingestion config: one dataclass per stage, each field documented. Load with
``pipeline.config.load_config(IngestConfig, yaml, overrides)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from pipeline.config import ConfigError


@dataclass
class InputConfig:
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    format: str = "auto"
    """parquet | csv | tsv | jsonl | auto (from the file extension)."""
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
    encode_quality: int = 95
    processes_count: int = 2
    thread_count: int = 16
    timeout: int = 10
    """Seconds before a stalled request counts as failed (reason: timeout)."""
    retries: int = 0
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
    captions: CaptionRules = field(default_factory=CaptionRules)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    images: ImageRules = field(default_factory=ImageRules)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
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
        if self.input.format not in ("auto", "parquet", "csv", "tsv", "jsonl"):
            raise ConfigError(f"input.format must be auto|parquet|csv|tsv|jsonl, got '{self.input.format}'")
