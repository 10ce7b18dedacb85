"""Training data from the shard folder: an exact-resume path (wids) and a streaming path (webdataset).

Exact path (default). The order is a function of (seed, epoch) alone: epoch e visits
``permutation_e = default_rng([seed, e]).permutation(N)``; global batch t of that epoch is
``permutation_e[t*B:(t+1)*B]`` and rank r of W takes the contiguous slice ``[r*b:(r+1)*b]``, b = B/W.
Each sample's augmentation is seeded from (seed, epoch, index), so what a sample looks like does not
depend on the rank count or the worker that decoded it: 2 ranks x b see exactly what 1 rank x 2b sees.
Resuming at optimizer step t only recomputes that permutation and slices it (O(1) in t); nothing
consumed is replayed. The last partial global batch of an epoch is dropped.

Streaming path (``data.streaming=true``): resampled shards (sampling with replacement), a shuffle
buffer, no index needed: suits object stores. It resumes only approximately (a fresh stream seeded
by (seed, rank, step)): same distribution, not the same samples.

Corrupt samples (bad JPEG, missing caption, truncated shard) are skipped and counted. On the exact path
a skipped sample is replaced by a deterministic substitute so that every rank keeps b samples (the
all-gathers of the loss need equal shapes) and the run stays rank-count-independent.
"""
from __future__ import annotations

import io
import random
import logging
from collections import OrderedDict
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from pipeline.manifest import read_manifest

log = logging.getLogger(__name__)

SampleId = Tuple[int, int]  # (epoch, global index in the split)
SUBSTITUTE_STRIDE = 7919  # prime stride: substitutes spread over shards rather than hitting the same bad one


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, sample): the sample's augmentation RNG."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class GlobalBatchOrder:
    """Which samples rank r trains on at optimizer step t (see the module docstring)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch > num_samples:
            raise ValueError(f"global batch {global_batch} exceeds the {num_samples} samples of the split")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.per_rank = rank, global_batch // world_size
        self.steps_per_epoch = num_samples // global_batch
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def rank_slice(self, step: int) -> List[SampleId]:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + self.rank * self.per_rank
        return [(epoch, int(i)) for i in self.permutation(epoch)[start:start + self.per_rank]]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's sample ids for steps start_step, start_step+1, ..., end_step-1."""

    def __init__(self, order: GlobalBatchOrder, start_step: int, end_step: int):
        self.order, self.start_step, self.end_step = order, start_step, end_step

    def __iter__(self) -> Iterator[List[SampleId]]:
        for step in range(self.start_step, self.end_step):
            yield self.order.rank_slice(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def decode_sample(raw: dict, transform: Callable, tokenizer: Callable) -> dict:
    """Raw tar members -> {image, text, key}; raises on anything corrupt."""
    def member(ext: str):
        value = raw[f".{ext}"] if f".{ext}" in raw else raw[ext]
        return value.getvalue() if hasattr(value, "getvalue") else value  # wids gives BytesIO streams

    with Image.open(io.BytesIO(member("jpg"))) as img:
        image = transform(img.convert("RGB"))
    caption = member("txt")
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
    if not caption.strip():
        raise ValueError("empty caption")
    return {"image": image, "text": tokenizer([caption])[0], "key": str(raw["__key__"])}


class IndexedShardDataset(torch.utils.data.Dataset):
    """Random access to (epoch, index) samples of a split through wids' indexed tar reader."""

    def __init__(self, folder: str, split: str, transform: Callable, tokenizer: Callable, seed: int,
                 max_substitutions: int = 16, open_shards: int = 8):
        manifest = read_manifest(folder)
        self.split = split
        self.paths = manifest.shard_paths(split)
        self.lengths = [s.num_samples for s in manifest.split(split).shards]
        self.cum = np.cumsum([0] + self.lengths)
        self.transform, self.tokenizer, self.seed = transform, tokenizer, seed
        self.max_substitutions, self.open_shards = max_substitutions, open_shards
        self._shards: "OrderedDict[int, object]" = OrderedDict()  # per worker process: opened lazily

    def __len__(self) -> int:
        return int(self.cum[-1])

    def _shard(self, shard_index: int):
        from wids.wids import IndexedTarSamples

        if shard_index not in self._shards:
            if len(self._shards) >= self.open_shards:
                _, old = self._shards.popitem(last=False)
                if old is not None:
                    old.close()
            try:
                self._shards[shard_index] = IndexedTarSamples(path=self.paths[shard_index])
            except Exception as err:  # truncated/corrupt tar: every sample in it counts as skipped
                log.warning("cannot index shard %s (%s): its samples are skipped", self.paths[shard_index], err)
                self._shards[shard_index] = None
        self._shards.move_to_end(shard_index)
        return self._shards[shard_index]

    def read(self, epoch: int, index: int) -> dict:
        shard_index = int(np.searchsorted(self.cum, index, side="right") - 1)
        shard = self._shard(shard_index)
        inner = index - int(self.cum[shard_index])
        if shard is None or inner >= len(shard):
            raise IndexError(f"sample {inner} missing from shard {self.paths[shard_index]}")
        raw = shard[inner]
        # Seeding per sample makes the augmentation independent of rank count, worker and resume point.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return decode_sample(raw, self.transform, self.tokenizer)

    def __getitem__(self, sample_id: SampleId) -> dict:
        epoch, index = sample_id
        for attempt in range(self.max_substitutions + 1):
            candidate = (index + attempt * SUBSTITUTE_STRIDE) % len(self)
            try:
                sample = self.read(epoch, candidate)
                sample["skipped"] = attempt
                return sample
            except Exception as err:
                log.warning("skipping corrupt sample %d of the %s split: %s", candidate, self.split, err)
        raise RuntimeError(f"{self.max_substitutions + 1} corrupt samples in a row from index {index}: "
                           "is the dataset folder intact?")


def collate(samples: Sequence[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples]),
            "keys": [s["key"] for s in samples], "skipped": sum(s.get("skipped", 0) for s in samples)}


def _worker_init(_):
    torch.set_num_threads(1)  # decode workers must not fight the training threads for cores


def build_exact_loader(folder: str, split: str, global_batch: int, rank: int, world_size: int, seed: int,
                       start_step: int, end_step: int, transform: Callable, tokenizer: Callable,
                       num_workers: int = 1, max_substitutions: int = 16) -> torch.utils.data.DataLoader:
    """Batches of this rank's b = global_batch / world_size samples, one per optimizer step."""
    dataset = IndexedShardDataset(folder, split, transform, tokenizer, seed, max_substitutions)
    order = GlobalBatchOrder(len(dataset), global_batch, rank, world_size, seed)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(order, start_step, end_step), collate_fn=collate,
        num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False, prefetch_factor=4 if num_workers else None)


class StreamingBatches(torch.utils.data.IterableDataset):
    """Resampled-shard stream (approximate resume): yields collated batches of ``per_rank`` samples."""

    def __init__(self, folder: str, split: str, per_rank: int, seed: int, transform: Callable,
                 tokenizer: Callable, shuffle_buffer: int = 1000):
        self.urls = read_manifest(folder).shard_paths(split)
        self.per_rank, self.seed = per_rank, seed
        self.transform, self.tokenizer, self.shuffle_buffer = transform, tokenizer, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        worker = torch.utils.data.get_worker_info()
        seed = self.seed * 1000 + (worker.id if worker else 0)
        unreadable = []  # tar-level errors (truncated shard, bad member): counted, not silently swallowed

        def count_and_continue(err: Exception) -> bool:
            unreadable.append(err)
            log.warning("skipping unreadable streamed shard data: %s", err)
            return True

        # wds.WebDataset(resampled=True) ignores its seed for shard choice (it mixes in pid and time), so the
        # pipeline is spelled out with a deterministic ResampledShards: the stream is a function of the seed.
        stream = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=count_and_continue),
            wds.shuffle(self.shuffle_buffer, rng=random.Random(seed)))
        batch, skipped = [], 0
        for raw in stream:
            skipped += len(unreadable)
            unreadable.clear()
            try:
                batch.append(decode_sample({k: v for k, v in raw.items()}, self.transform, self.tokenizer))
            except Exception as err:
                skipped += 1
                log.warning("skipping corrupt streamed sample %s: %s", raw.get("__key__"), err)
                continue
            if len(batch) == self.per_rank:
                out = collate(batch)
                out["skipped"] = skipped
                yield out
                batch, skipped = [], 0


def build_streaming_loader(folder: str, split: str, per_rank: int, rank: int, seed: int, start_step: int,
                           transform: Callable, tokenizer: Callable, num_workers: int = 1,
                           shuffle_buffer: int = 1000) -> torch.utils.data.DataLoader:
    # Approximate resume: a new stream per (seed, rank, start step), never the one that was interrupted.
    stream_seed = int(np.random.SeedSequence([seed, rank, start_step]).generate_state(1)[0])
    dataset = StreamingBatches(folder, split, per_rank, stream_seed, transform, tokenizer, shuffle_buffer)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       worker_init_fn=_worker_init if num_workers else None)
