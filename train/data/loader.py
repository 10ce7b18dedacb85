"""Training batches from a manifest's shards: one exact, elastic, streaming-order loader.

The order (``train.data.shard_order``) is a pure function of (seed, step, manifest, global batch B,
partitions P): shards permuted per epoch and read sequentially by P canonical streams, samples
shuffled within a window of shards, global batch t = B/P samples of every stream. Rank r of W reads
only its P/W streams, so the bytes a rank reads per epoch are its 1/W share of the dataset (plus
tar headers), and 2 ranks x b train on exactly the samples of 1 rank x 2b. Resuming at step t
recomputes the order at t (O(#shards)); nothing is replayed, and a different world size (W dividing
P) or ``data.num_workers`` continues the same global order. DataLoader worker k of n decodes the
steps t = start + k, start + k + n, ...; the DataLoader returns them in step order.

Each sample's augmentation is seeded from (seed, epoch, global sample index): what a sample looks
like does not depend on the rank count, the worker or the resume point.

Bad data: an unreadable sample (corrupt image, missing member, cut by a truncated shard, or in a
shard that cannot be fetched after retries) is skipped and counted, and its slot takes a substitute
(``train.data.shard_order.Substitutes``): a readable sample of the same shuffle block drawn at random, not
one of the batch (else one of the epoch's other blocks), chosen from (seed, epoch, stream, step) and the
data alone. So every rank's batch stays full, the choice does not depend on the rank count, worker or
resume point, no sample appears twice in a global batch, and the stand-ins spread over the block (on average
m / (S - m) extra uses per readable sample of a block with m of S unreadable). Shards come from
``train.data.shard_source`` (local, fsspec URLs, pipe:).

A mixture (``data.sources``) is one such order per source sharing the P streams (train/data/mixture.py): each
stream's c samples of a step are the sources' fixed shares of it, read by one ShardReader per source.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.shard_folder import Manifest, load_sample_index, read_manifest
from train.data.decode import decode_image, find_member, image_member
from train.data.mixture import DataOrder, make_data_order
from train.data.shard_order import ShardOrder, Slot, Substitutes
from common.shard_folder import READABLE_COMPRESSIONS, ShardFormatError, compression_of, unreadable_compression
from common.errors import InputError
from train.data.shard_source import (CountingFile, ShardCache, ShardUnavailable, check_shard, is_remote, join,
                                     read_members)

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int, source: int = 0) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, sample, data source): the sample's augmentation RNG.

    blake2b of the numbers (a SeedSequence costs 50 us per sample; this, about 1 us). Source 0 (the only one
    of an unmixed run) hashes the three numbers alone, as before mixtures existed."""
    text = f"{seed},{epoch},{index}" if source == 0 else f"{seed},{epoch},{index},{source}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def decode_sample(raw: Dict[str, bytes], transform: Callable, tokenizer: Callable, image_ext: str = "jpg",
                  caption_ext: str = "txt") -> dict:
    """Raw tar members -> {image, text, key}; raises on anything missing or corrupt.

    ``image_ext`` is the extension the manifest records (``download.encode_format``); a sample that
    lacks it falls back to any other image extension it holds (train.data.decode: any case, as webdataset).
    """
    ext, caption_key = image_member(raw, image_ext), find_member(raw, caption_ext)
    if ext is None:
        raise KeyError(f"no image member (.{image_ext}) in sample {raw.get('__key__')}: has {sorted(raw)}")
    if caption_key is None:
        raise KeyError(f"no caption member (.{caption_ext}) in sample {raw.get('__key__')}")
    image = transform(decode_image(raw[ext]).convert("RGB"))
    caption = raw[caption_key].decode("utf-8")
    if not caption.strip():
        raise ValueError("empty caption")
    return {"image": image, "text": tokenizer([caption])[0], "key": str(raw["__key__"])}


class ShardReader:
    """One worker's open shards (LRU), fetched through the cache when remote; counts the bytes it reads."""

    def __init__(self, manifest: Manifest, split: str, cache: ShardCache, max_open: int):
        shards = manifest.split(split).shards
        self.root, self.rels, self.sha = manifest.root, [s.path for s in shards], [s.sha256 for s in shards]
        self.index_rels = [s.index for s in shards]
        self.urls = [join(self.root, rel) for rel in self.rels]  # a shard indexed in place names its own location
        self.is_remote = [is_remote(url) for url in self.urls]
        self.cache, self.max_open, self.remote = cache, max_open, any(self.is_remote)
        self.open: "OrderedDict[int, Optional[Tuple[CountingFile, np.ndarray]]]" = OrderedDict()
        self.bytes_read = [0]
        self._pool = ThreadPoolExecutor(4) if self.remote else None
        self._pending: Dict[int, object] = {}
        self._warned: set = set()

    def warn_once(self, shard: int, kind: str, detail: str) -> None:
        """One log line per shard and kind of problem, not per sample: a bad shard holds thousands of
        samples, and every skipped one is counted exactly in metrics.jsonl's skipped_samples anyway."""
        if (shard, kind) not in self._warned:
            self._warned.add((shard, kind))
            log.warning("shard %s: skipping its %s samples (counted in skipped_samples, logged once per shard); "
                        "first: %s", self.rels[shard], kind, detail)

    def _local_path(self, shard: int) -> str:
        """The shard as a local plain tar: remote and compressed ones through the cache (shard_source)."""
        url = self.urls[shard]
        if self.is_remote[shard]:
            return self.cache.get(url, self.sha[shard])
        with open(url, "rb", buffering=0) as f:  # 6 bytes per shard opened (unbuffered: not 8 KiB): its compression
            compression = compression_of(f.read(6))
        if not compression:
            return url
        if compression not in READABLE_COMPRESSIONS:
            raise unreadable_compression(self.rels[shard], compression)
        return self.cache.get(url, self.sha[shard], key=self._identity(shard))

    def prefetch(self, shards: Sequence[int]) -> None:
        """Start fetching remote shards in the background (no-op for local ones)."""
        if self._pool is None:
            return
        for s in map(int, shards):
            if self.is_remote[s] and s not in self.open and s not in self._pending:
                self._pending[s] = self._pool.submit(self._local_path, s)

    def shard(self, shard: int) -> Optional[Tuple[CountingFile, np.ndarray]]:
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        pending = self._pending.pop(shard, None)
        try:
            if pending is not None:
                pending.result()  # a prefetch that failed after its retries raises ShardUnavailable here
            path = self._local_path(shard)
            index = self._manifest_index(shard)
            if index is None:  # shards without an ingestion index: scanned once per node, then shared
                index = self.cache.index(path, self._identity(shard, path), self.bytes_read, self.rels[shard])
            handle = (CountingFile(path, self.bytes_read), index)
        except ShardFormatError as err:  # the message names the shard, the rule and the fix
            log.warning("%s; its samples are skipped (counted in skipped_samples)", err)
            handle = None
        except (ShardUnavailable, OSError) as err:
            log.warning("shard %s unavailable, its samples are skipped (counted in skipped_samples): %s",
                        self.rels[shard], err)
            handle = None
        self.open[shard] = handle
        while len(self.open) > self.max_open:
            _, old = self.open.popitem(last=False)
            if old is not None:
                old[0].close()
        return handle

    def _identity(self, shard: int, path: str = "") -> str:
        """What names a shard's content: URL + sha256 + size of the cached ``path`` when remote, path + size +
        mtime when local (of the file named, compressed or not)."""
        if self.is_remote[shard]:
            return f"{self.urls[shard]}:{self.sha[shard]}:{os.path.getsize(path)}"
        st = os.stat(self.urls[shard])
        return f"{os.path.realpath(self.urls[shard])}:{st.st_size}:{st.st_mtime_ns}"

    def _manifest_index(self, shard: int) -> Optional[np.ndarray]:
        """The sample index the ingestion wrote beside the shard (16 bytes per sample), if any."""
        if not self.index_rels[shard]:
            return None
        location = join(self.root, self.index_rels[shard])
        try:
            path = self.cache.get(location) if is_remote(location) else location
            with open(path, "rb") as f:
                data = f.read()
            self.bytes_read[0] += len(data)
            return load_sample_index(data)
        except (ShardUnavailable, OSError, ValueError) as err:
            log.warning("sample index %s unusable (%s): scanning the tar instead", location, err)
            return None

    def known_bad(self, shards: np.ndarray, inners: np.ndarray) -> np.ndarray:
        """Bool mask of the (shard, index in shard) samples known unreadable without decoding: in a shard that is
        unavailable, or past the end of its (truncated) tar. Opens the shards (Substitutes' filter)."""
        bad = np.ones(len(shards), dtype=bool)
        for shard in np.unique(shards).tolist():
            handle = self.shard(shard)
            if handle is None:
                continue
            f, index = handle
            mine = shards == shard
            wanted = inners[mine]
            inside = wanted < len(index)
            ends = index[np.minimum(wanted, max(len(index) - 1, 0)), 1] if len(index) else wanted
            bad[mine] = ~inside | (ends > f.size)
        return bad

    def read(self, shard: int, inner: int) -> Dict[str, bytes]:
        handle = self.shard(shard)
        if handle is None:
            raise ShardUnavailable(f"shard {self.rels[shard]} is unavailable")
        f, index = handle
        if inner >= len(index):
            raise IndexError(f"sample {inner} missing from {self.rels[shard]} ({len(index)} readable: truncated?)")
        start, end = index[inner]
        if end > f.size:  # an index longer than a truncated tar: known missing, nothing to decode
            raise IndexError(f"sample {inner} lies past the end of {self.rels[shard]} (truncated)")
        self.bytes_read[0] += int(end - start)
        return read_members(f.f.fileno(), int(start), int(end))


@dataclass(frozen=True)
class Shards:
    """Where a loader's samples come from: one split of a dataset folder, remote shards through the cache."""

    manifest: Manifest
    split: str
    cache: ShardCache


@dataclass(frozen=True)
class RankSteps:
    """What one rank makes: the batches of steps [start, end) of ``order``, from its ``streams`` of it."""

    order: DataOrder
    streams: range
    start: int
    end: int


@dataclass(frozen=True)
class SampleRecipe:
    """How a sample's raw members become a training sample."""

    transform: Callable
    """PIL image (RGB) -> image tensor (the model's train preprocess, augmentation included)."""
    tokenizer: Callable
    """list of str -> (n, L) int64 tokens."""
    seed: int
    """The run seed: each sample's augmentation RNG is seeded from (seed, epoch, sample) (sample_seed)."""
    max_substitutions: int
    """Corrupt samples tried in a row for one batch slot before the loader gives up with an error."""


class StepBatches(torch.utils.data.IterableDataset):
    """This rank's batches for steps [steps.start, steps.end); worker k of n makes every n-th of them.

    ``sources[i]`` holds the shards of ``steps.order.orders[i]`` (one per data source; train/data/mixture.py)."""

    def __init__(self, sources: Sequence[Shards], steps: RankSteps, recipe: SampleRecipe):
        self.sources, self.steps, self.recipe = list(sources), steps, recipe
        self.order = steps.order
        self.exts = [(s.manifest.fields.get("image", "jpg"), s.manifest.fields.get("caption", "txt"))
                     for s in self.sources]

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker else (0, 1)
        # Open shards: this rank's current and next block of every stream, per source.
        streams, orders = self.steps.streams, self.order.orders
        readers = [ShardReader(s.manifest, s.split, s.cache, 2 * len(streams) * self.order.window + 2)
                   for s in self.sources]
        for step in range(self.steps.start + k, self.steps.end, n):
            before = sum(r.bytes_read[0] for r in readers)
            samples, skipped = [], 0
            for stream in streams:  # stream-major, then source: the global batch's order (mixture.py)
                for source, (order, reader) in enumerate(zip(orders, readers)):
                    slots = order.slots(step, stream)
                    self._prefetch(reader, order, slots[0])
                    substitutes = None  # made at this stream's first unreadable slot of the step
                    for slot in slots:
                        sample, failures = self._read(reader, slot.sample(), slot, source, 0)
                        if sample is None:
                            substitutes = substitutes or Substitutes(order, step, stream, reader.known_bad, self.reserve(order))
                            sample = self._substitute(reader, slot, substitutes, source, failures)
                            skipped += 1
                        samples.append(sample)
            batch = collate(samples)
            batch.update(step=step, skipped=skipped, bytes_read=sum(r.bytes_read[0] for r in readers) - before)
            yield batch

    @staticmethod
    def _prefetch(reader: ShardReader, order: ShardOrder, slot: Slot) -> None:
        if not reader.remote:
            return
        blocks, _ = order.blocks(slot.epoch, slot.stream)
        reader.prefetch(slot.shards)
        if slot.block + 1 < len(blocks):
            reader.prefetch(blocks[slot.block + 1][:, 0])

    def reserve(self, order: ShardOrder) -> int:
        """Entries of a block's near sequence its own stream keeps (Substitutes): 2c, room for every slot of a
        step and as many corrupt stand-ins (missing ones are left out of the sequence beforehand)."""
        return 2 * order.per_stream

    def _read(self, reader: ShardReader, candidate: Tuple[int, int, int], slot: Slot, source: int,
              failures: int) -> Tuple[Optional[dict], int]:
        """(the decoded sample or None when unreadable, decode failures so far for the slot)."""
        shard, inner, index = candidate
        try:
            raw = reader.read(shard, inner)
        except (ShardUnavailable, IndexError, OSError, KeyError) as err:  # known missing: no decode spent
            if not isinstance(err, ShardUnavailable):  # (that one was logged by shard())
                reader.warn_once(shard, "missing", f"sample {inner}: {err}")
            return None, failures
        try:
            # Seeding per sample makes the augmentation independent of rank count, worker and resume point.
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues lazy CUDA/XPU/MTIA seeding, each
                # call formatting a stack trace (measured: 1.3 ms per sample, a quarter of a decode)
                torch.default_generator.manual_seed(sample_seed(self.recipe.seed, slot.epoch, index, source))
                return decode_sample(raw, self.recipe.transform, self.recipe.tokenizer, *self.exts[source]), failures
        except Exception as err:
            reader.warn_once(shard, "corrupt", f"sample {raw.get('__key__')}: {err}")
            return None, failures + 1

    def _substitute(self, reader: ShardReader, slot: Slot, substitutes: Substitutes, source: int,
                    failures: int) -> dict:
        """A stand-in for the unreadable ``slot`` (Substitutes: same block first, never one of the batch); a
        RuntimeError after more than ``max_substitutions`` corrupt samples in a row, or when none is left."""
        for candidate in substitutes.candidates(slot):
            if failures > self.recipe.max_substitutions:
                break
            sample, failures = self._read(reader, candidate, slot, source, failures)
            if sample is not None:
                return sample
        raise RuntimeError(f"no readable sample for a slot of stream {slot.stream}, epoch {slot.epoch}, block "
                           f"{slot.block} ({failures} corrupt in a row; shards {list(map(int, slot.shards))}): "
                           "is the dataset intact and reachable?")


def collate(samples: Sequence[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples]),
            "keys": [s["key"] for s in samples]}


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


def _worker_init(_):
    torch.set_num_threads(1)  # decode workers must not fight the training threads for cores
    # SLURM preemption, scancel, torchrun and Ctrl-C signal the whole process group. A worker killed by
    # it makes the trainer's stop checkpoint fail ("DataLoader worker ... killed by signal"); the main
    # process decides when to stop and shuts its workers down itself (StatefulLoader.close), and a
    # worker still exits when the trainer dies (torch's watchdog on the parent pid).
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def make_cache(data) -> ShardCache:
    """Remote shards and every shard's sample index live here (see train.data.shard_source)."""
    cache_dir = data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "clip_pipeline", "shards")
    try:
        return ShardCache(cache_dir, int(data.cache_limit_gb * 2**30), data.retries, data.retry_backoff_s,
                          dict(data.storage_options or {}))
    except OSError as err:
        raise OSError(f"data.cache_dir={cache_dir} is not usable ({err}): point it at a writable local disk") from None


def read_manifests(data) -> List[Manifest]:
    """The manifest of each of ``data.datasets()`` (a DataConfig's one dataset or its mixture), in order."""
    return [read_manifest(src.path, dict(data.storage_options or {})) for src in data.datasets()]


def check_first_shards(manifests: Sequence[Manifest], data) -> None:
    """InputError (one line) when the first shard of a source without sample indexes (shards counted, not scanned:
    a hand-written manifest, stats files) breaks a rule its shards would then all break (keys with dots, a
    compression no reader here reads): said at start, not after an epoch of skipped samples. Indexed shards were
    checked when they were scanned (the ingestion, ``python -m pipeline index``)."""
    for manifest, src in zip(manifests, data.datasets()):
        shards = manifest.split(src.split).shards
        if shards and not shards[0].index:
            try:
                check_shard(join(manifest.root, shards[0].path), dict(data.storage_options or {}))
            except ShardFormatError as err:
                raise InputError(f"{src.path}: {err}") from None


def build_loader(data, rank: int, world_size: int, seed: int, start_step: int, end_step: int,
                 transform: Callable, tokenizer: Callable, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of this rank's b = B / W samples for optimizer steps start_step .. end_step - 1.

    ``data`` is a ``train.config.DataConfig`` (one dataset or a mixture). Each batch: image (b, 3, H, W) float,
    text (b, L) int64, keys (b sample keys), skipped (unreadable samples replaced in it), step, bytes_read
    (shard bytes the worker read for it). Raises ValueError when W does not divide the partitions, InputError
    when the first shard shows the dataset cannot be read (check_first_shards). ``pin_memory`` (CUDA trainers
    only): the DataLoader puts the batches' tensors in page-locked memory, from which ``.to(device,
    non_blocking=True)`` is an asynchronous copy (from pageable memory it is synchronous).
    """
    manifests = read_manifests(data)
    check_first_shards(manifests, data)
    order = make_data_order(manifests, data, seed)
    cache = make_cache(data)
    sources = [Shards(m, src.split, cache) for m, src in zip(manifests, data.datasets())]
    dataset = StepBatches(sources, RankSteps(order, order.rank_streams(rank, world_size), start_step, end_step),
                          SampleRecipe(transform, tokenizer, seed, data.max_substitutions))
    if rank == 0 and start_step == 0:
        log.info("data: %s", order.describe())
        if order.share_warning():
            log.warning(order.share_warning())
    workers = data.num_workers
    # Its own generator: without one, each iter() draws the workers' base seed from torch's global generator,
    # which the model's own draws (model.patch_dropout) share; a resumed run restores that generator and then
    # starts the loader, so the draw would shift every later patch-dropout mask (the samples are seeded apart).
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       worker_init_fn=_worker_init if workers else None,
                                       prefetch_factor=2 if workers else None, persistent_workers=False,
                                       pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed + start_step))
