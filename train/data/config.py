"""The ``data`` section of the trainer's configuration (train/config.py): one dataset or a mixture of sources."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class DataSource:
    """One dataset of a mixture (``data.sources``): each global batch takes its share of the samples."""

    path: str = ""
    """Dataset folder with manifest.json (local, URL or pipe:), as ``data.path``: made by the ingestion or by
    ``python -m pipeline index`` over shards that already exist."""
    weight: float = 1.0
    """Relative share of every global batch (weights are normalised over the sources)."""
    name: str = ""
    """Label in metrics.jsonl (``data/NAME/samples``, ``data/NAME/epoch``); empty = the folder's name."""
    split: str = ""
    """Manifest split to train on; empty = ``data.split``."""


def source_name(source: DataSource) -> str:
    """A source's label: its ``name``, else the last part of its path (``s3://b/laion/`` -> ``laion``)."""
    return source.name or re.split(r"[/ ]", source.path.rstrip("/"))[-1] or "source"


@dataclass
class DataConfig:
    path: str = "data/fmnist"
    """Dataset folder with manifest.json (the ingestion stage's output, or ``python -m pipeline index``'s)."""
    sources: List[DataSource] = field(default_factory=list)
    """A mixture instead of ``data.path`` (which is then not used), e.g. ``[{path: A, weight: 3}, {path: B,
    weight: 1}]``: every global batch takes each source's share (largest remainder, fixed for the run) and
    each source runs through its own epochs (train/data/mixture.py). Empty = the one dataset ``data.path``."""
    split: str = "train"
    """Manifest split to train on."""
    global_batch_size: int = 64
    """Samples per optimizer step over all ranks: the set of negatives of the contrastive loss."""
    accum_freq: int = 1
    """Micro-batches per optimizer step on each rank; features are cached so all negatives are kept."""
    num_workers: int = 1
    """DataLoader worker processes per rank (decode + augment); 0 decodes in the training process."""
    streams: int = 0
    """P, the canonical streams of the order (train/data/shard_order.py). 0 = auto: the largest power of two
    <= min(64, #shards) dividing global_batch_size. Keep it fixed for a run: the order depends on it.
    Rule: P divides global_batch_size and the world size divides P (every rank reads P / W streams)."""
    shuffle_window: int = 4
    """Shards per shuffle block of a stream: samples are shuffled within blocks of this many shards."""
    max_substitutions: int = 16
    """Corrupt samples tried in a row for one batch slot before giving up with an error."""
    cache_dir: str = ""
    """Local cache of remote shards (http(s)://, s3://, gs://, pipe:) and of every shard's sample index
    (16 bytes per sample, shared by the processes of a node); empty = ~/.cache/clip_pipeline/shards."""
    cache_limit_gb: float = 50.0
    """Cache size limit in GiB (least recently used shards are evicted); must hold about
    2 x shuffle_window x P / W shards for the ranks of one node that share it."""
    retries: int = 3
    """Extra attempts for a failing remote shard (exponential backoff) before its samples are skipped."""
    retry_backoff_s: float = 1.0
    """First retry delay in seconds; doubles on every further attempt."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote paths, e.g. {endpoint_url: http://127.0.0.1:8333} for an S3-compatible
    store (s3fs also honours AWS_* environment variables)."""

    def datasets(self) -> List[DataSource]:
        """The run's sources with every default filled in (name, split): ``sources``, or ``path`` as the one source."""
        given = self.sources or [DataSource(path=self.path)]
        return [DataSource(path=s.path, weight=s.weight, name=source_name(s), split=s.split or self.split)
                for s in given]
