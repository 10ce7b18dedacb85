"""The global sample order of training: a pure function of (seed, epoch, manifest, global batch, P).

The scheme is mosaicml-streaming's canonical partitions applied to WebDataset shards:

* Epoch e permutes the shards: ``perm_e = default_rng([seed, e]).permutation(num_shards)``.
* The permuted shards, laid end to end, are cut into P canonical partitions ("streams") of
  L = floor(N / P) samples each: stream p holds samples [p*L, (p+1)*L) of that sequence, i.e. a run of
  consecutive shards (the first and last possibly in part). A stream reads its shards one after
  another (sequential reads: the speed of a streaming pipeline).
* Each stream cuts its shard pieces into blocks of ``window`` pieces; the samples of block k are
  visited in the order ``default_rng([seed, e, p, k]).permutation(block_size)`` (the shuffle window).
* Global batch t takes c = B / P consecutive samples from every stream, stream 0 first.
  Rank r of W trains on streams ``[r*P/W, (r+1)*P/W)``: a contiguous slice of the global batch, so
  2 ranks x b see exactly the samples of 1 rank x 2b. The rule: W divides P and P divides B.
* ``steps_per_epoch = L // c`` does not depend on e: step t lives in epoch ``t // steps_per_epoch``.
  An epoch visits all but fewer than P + B samples (the remainders of N / P and L / c); a different
  permutation leaves out different ones. A shard cut between two streams is read in part by each
  (for remote shards that costs one extra shard download per stream and epoch).

Memory per rank: the shard sizes, one shard permutation per epoch (O(#shards)) and one block
permutation per stream (O(window x samples per shard)); never O(#samples). Resuming at step t
computes the same arrays: O(#shards), no replay.

Shuffle quality: a global batch draws c samples from each of P streams, each out of a window of
``window`` shards; so one batch mixes samples of up to P * window distinct shards (a global shuffle
would draw B samples from min(B, #shards) shards); consecutive batches of one stream are correlated
within a block. The ingestion's reshard stage already shuffles samples across shards, which is what
makes a block-local shuffle sufficient.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from common.shard_folder import Manifest
    from train.config import DataConfig

MAX_AUTO_PARTITIONS = 64


def auto_partitions(num_shards: int, global_batch: int, cap: int = MAX_AUTO_PARTITIONS) -> int:
    """The default P: the largest power of two <= min(cap, num_shards) that divides the global batch.

    A function of the dataset and the batch only (never of the world size), so every restart agrees.
    """
    p = 1
    while p * 2 <= min(cap, num_shards) and global_batch % (p * 2) == 0:
        p *= 2
    return p


def make_order(manifest: "Manifest", data: "DataConfig", seed: int) -> "ShardOrder":
    """The order of ``data.split`` of ``manifest`` for the run seed and the DataConfig's global batch,
    partitions (0 = auto_partitions) and shuffle window: the one place that reads those fields."""
    shards = manifest.split(data.split).shards
    sizes = [s.num_samples for s in shards]
    partitions = data.streams or auto_partitions(len(sizes), data.global_batch_size)
    return ShardOrder(sizes, data.global_batch_size, partitions, data.shuffle_window, seed, shards_sha1(shards))


def shards_sha1(shards: Sequence) -> str:
    """The identity of a split's shards, wherever the dataset lives: sha1 over each shard's name (its path as
    the manifest writes it when relative, else the last component of its location), sample count and checksum
    (when the manifest has one). A dataset copied or spelled otherwise keeps it; other shards change it."""
    def name(path: str) -> str:
        return path if not (os.path.isabs(path) or "://" in path or path.startswith("pipe:")) \
            else path.rstrip("/").rsplit("/", 1)[-1]
    text = "\n".join(f"{name(s.path)}\t{s.num_samples}\t{s.sha256}" for s in shards)
    return hashlib.sha1(text.encode()).hexdigest()


class ShardOrder:
    """Which (shard, sample-in-shard) pairs each stream contributes to global batch t (see module doc)."""

    def __init__(self, shard_sizes: Sequence[int], global_batch: int, partitions: int, window: int, seed: int,
                 content: str = ""):
        self.content = content  # shards_sha1 of the shards (the dataset's identity; '' = unknown)
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if partitions < 1 or global_batch % partitions:
            raise ValueError(f"data.streams={partitions} must divide data.global_batch_size={global_batch}")
        if window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {window}")
        self.sizes, self.partitions, self.window, self.seed = sizes, partitions, window, seed
        self.per_stream = global_batch // partitions
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # global index of each shard's first sample
        self.stream_len = int(self.offsets[-1]) // partitions
        self.steps_per_epoch = self.stream_len // self.per_stream
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.offsets[-1]} samples cannot fill one global batch of {global_batch}")
        self._init_caches()

    def _init_caches(self) -> None:
        self._epoch, self._perm, self._ends = -1, None, None
        self._block_perm = lru_cache(maxsize=2 * self.partitions)(self._make_block_perm)
        self.blocks = lru_cache(maxsize=2 * self.partitions)(self._blocks)  # per (epoch, stream): O(#shards / P)

    def __getstate__(self) -> dict:  # DataLoader workers under spawn/forkserver: caches are rebuilt there
        return {k: v for k, v in self.__dict__.items() if k not in ("_block_perm", "blocks", "_perm", "_ends")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    # ------------------------------------------------------------------ streams and blocks
    def shard_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
            self._ends = np.cumsum(self.sizes[self._perm])  # end of each permuted shard in the sequence
        return self._perm

    def pieces(self, epoch: int, stream: int) -> np.ndarray:
        """(k, 3) int64: the stream's shards in read order as (shard id, first sample, end sample)."""
        perm = self.shard_permutation(epoch)
        a, b = stream * self.stream_len, (stream + 1) * self.stream_len
        i0, i1 = int(np.searchsorted(self._ends, a, side="right")), int(np.searchsorted(self._ends, b, side="left"))
        shards = perm[i0:i1 + 1]
        begins = self._ends[i0:i1 + 1] - self.sizes[shards]
        lo, hi = np.maximum(a - begins, 0), np.minimum(b - begins, self.sizes[shards])
        keep = hi > lo
        return np.stack([shards[keep], lo[keep], hi[keep]], axis=1)

    def _blocks(self, epoch: int, stream: int) -> Tuple[List[np.ndarray], np.ndarray]:
        """The stream's blocks (piece arrays) and each block's first position in the stream."""
        pieces = self.pieces(epoch, stream)
        blocks = [pieces[i:i + self.window] for i in range(0, len(pieces), self.window)]
        starts = np.concatenate([[0], np.cumsum([int((b[:, 2] - b[:, 1]).sum()) for b in blocks])])
        return blocks, starts

    def _make_block_perm(self, epoch: int, stream: int, block: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, stream, block]).permutation(size)

    def state_dict(self) -> dict:
        """What the order depends on besides (seed, step): a resumed run must match it exactly."""
        return {"partitions": self.partitions, "window": self.window, "global_batch": self.per_stream * self.partitions,
                "seed": self.seed, "num_shards": len(self.sizes), "num_samples": self.num_samples,
                "shard_sizes_sha1": hashlib.sha1(self.sizes.tobytes()).hexdigest(),
                **({"shards_sha1": self.content} if self.content else {})}

    def check_resume(self, saved: dict) -> None:
        """ValueError naming what differs when a checkpoint was trained on another order.

        World size and data.num_workers are not part of it: they may change on resume."""
        mine = self.state_dict()
        changed = {k: (saved[k], mine[k]) for k in mine if k in saved and saved[k] != mine[k]}
        if changed:
            raise ValueError("the checkpoint was trained on another sample order (saved -> now): " +
                             ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) +
                             "; resume with the same dataset, data.streams, data.shuffle_window and batch")

    def rank_streams(self, rank: int, world_size: int) -> range:
        if self.partitions % world_size:
            raise ValueError(f"{world_size} ranks cannot share data.streams={self.partitions} streams: the "
                             "world size must divide it (set data.streams to a multiple of it; it must then "
                             "stay fixed for the whole run)")
        per = self.partitions // world_size
        return range(rank * per, (rank + 1) * per)

    # ------------------------------------------------------------------ samples
    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def slots(self, step: int, stream: int) -> List["Slot"]:
        """The c samples stream ``stream`` contributes to global batch ``step``, in batch order."""
        epoch, position = divmod(step, self.steps_per_epoch)
        blocks, starts = self.blocks(epoch, stream)
        out = []
        for j in range(position * self.per_stream, (position + 1) * self.per_stream):
            k = int(np.searchsorted(starts, j, side="right") - 1)
            out.append(Slot(self, epoch, stream, k, blocks[k], int(j - starts[k])))
        return out


class Slot:
    """One position of a block's shuffled order: ``sample()`` is what it holds (``Substitutes`` stand in for it)."""

    __slots__ = ("order", "epoch", "stream", "block", "pieces", "local")

    def __init__(self, order: ShardOrder, epoch: int, stream: int, block: int, pieces: np.ndarray, local: int):
        self.order, self.epoch, self.stream, self.block = order, epoch, stream, block
        self.pieces, self.local = pieces, local

    @property
    def shards(self) -> np.ndarray:
        return self.pieces[:, 0]

    def sample(self) -> Tuple[int, int, int]:
        """(shard, index in shard, global index) of this slot's sample."""
        lengths = self.pieces[:, 2] - self.pieces[:, 1]
        perm = self.order._block_perm(self.epoch, self.stream, self.block, int(lengths.sum()))
        local = int(perm[self.local])
        bounds = np.cumsum(lengths)
        i = int(np.searchsorted(bounds, local, side="right"))
        shard, inner = int(self.pieces[i, 0]), int(self.pieces[i, 2]) - int(bounds[i]) + local
        return shard, inner, int(self.order.offsets[shard]) + inner

    def candidates(self) -> Iterator[Tuple[int, int, int]]:
        """The slot's own sample (as ``sample()``); the loader asks ``Substitutes`` when it is unreadable."""
        yield self.sample()


KnownBad = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(shards, indexes in shard) -> bool mask of the samples known unreadable without decoding them (shard
unavailable, index past a truncated end): the loader's ShardReader.known_bad."""


class Substitutes:
    """Stand-ins for the unreadable slots of one stream of one global batch: a pure function of (seed, epoch,
    stream, step) and of which samples are readable, so every rank count, worker count and resume point picks
    the same ones.

    * near: a sample of the slot's own shuffle block, outside this batch's slots, in the order of a permutation
      seeded with (seed, epoch, stream, block, step) ("the near sequence"): spread over the block, where taking
      "the next readable position" piled every unreadable run of the shuffled block onto one sample.
    * far, once the block has none left (its shards all missing, e.g. a whole stream of a small dataset): a
      sample of the epoch's blocks that no stream reads in this batch, then of the other streams' blocks of this
      batch beyond the first ``reserve`` entries of their near sequences (the loader: 2c, what that stream's
      own slots may take). Stream p takes only samples whose global index is p modulo P, so two streams (two
      ranks) never pick the same one.

    Bounds: no sample appears twice in a global batch: a substitute is never a slot of it, nor another
    substitute (the one exception needs two faults in one batch: a stream with no readable sample in its
    block, and another that tries more than c corrupt, not missing, stand-ins). Each substitute is drawn uniformly from its pool: a block with m unreadable samples of S gives
    each of its readable ones m / (S - m) extra uses per epoch on average (one missing shard of a window of w
    equal shards: 1 / (w - 1)), the most used one about the maximum of m random draws over S - m samples
    (measured: 4-6 uses in an epoch of 5,120 samples with a 128-sample shard missing, window 2), where the
    next-readable rule reused one sample once per unreadable neighbour (7, and 111 in the issue's data).
    """

    TAG = 0x5B5  # separates the substitutes' random streams from the order's own

    def __init__(self, order: "ShardOrder", step: int, stream: int, known_bad: KnownBad, reserve: int):
        self.order, self.stream, self.known_bad, self.reserve = order, stream, known_bad, reserve
        self.epoch, self.position = divmod(step, order.steps_per_epoch)
        self._near: Dict[int, Iterator[Tuple[int, int, int]]] = {}
        self._far: Optional[Iterator[Tuple[int, int, int]]] = None

    def candidates(self, slot: Slot) -> Iterator[Tuple[int, int, int]]:
        """(shard, index in shard, global index) stand-ins for ``slot``, near ones first; each is offered once
        per batch and stream (a decode that fails uses it up too)."""
        if slot.block not in self._near:
            shards, inners = self._near_sequence(self.stream, slot.block)
            self._near[slot.block] = self._emit(shards, inners)
        for candidate in self._near[slot.block]:  # not ``yield from``: closing this must not close the shared one
            yield candidate
        if self._far is None:
            self._far = self._far_candidates()
        for candidate in self._far:
            yield candidate

    def _window(self, starts: np.ndarray, block: int) -> Tuple[int, int]:
        """This batch's slots in ``block`` of a stream whose blocks start at ``starts``: a range of its
        shuffled positions (empty when the batch reads nothing of it)."""
        c, first, size = self.order.per_stream, int(starts[block]), int(starts[block + 1] - starts[block])
        return min(max(self.position * c - first, 0), size), min(max((self.position + 1) * c - first, 0), size)

    def _emit(self, shards: np.ndarray, inners: np.ndarray) -> Iterator[Tuple[int, int, int]]:
        offsets = self.order.offsets
        for shard, inner in zip(shards.tolist(), inners.tolist()):
            yield shard, inner, int(offsets[shard]) + inner

    def _near_sequence(self, stream: int, block: int) -> Tuple[np.ndarray, np.ndarray]:
        """(shards, indexes in shard): the near sequence of ``block`` of ``stream``, known-bad samples left out."""
        order = self.order
        blocks, starts = order.blocks(self.epoch, stream)
        pieces = blocks[block]
        lengths = pieces[:, 2] - pieces[:, 1]
        perm = order._block_perm(self.epoch, stream, block, int(lengths.sum()))
        lo, hi = self._window(starts, block)
        rng = np.random.default_rng([order.seed, self.epoch, stream, block, self.position, self.TAG])
        local = rng.permutation(np.concatenate([perm[:lo], perm[hi:]]))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        i = np.searchsorted(bounds, local, side="right") - 1
        shards, inners = pieces[i, 0], pieces[i, 1] + local - bounds[i]
        keep = ~self.known_bad(shards, inners)
        return shards[keep], inners[keep]

    def _mine(self, shards: np.ndarray, inners: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The samples whose global index is this stream modulo P."""
        mine = (self.order.offsets[shards] + inners) % self.order.partitions == self.stream
        return shards[mine], inners[mine]

    def _far_candidates(self) -> Iterator[Tuple[int, int, int]]:
        order, P = self.order, self.order.partitions
        idle, busy = [], []  # pieces of blocks this batch does not read; (stream, block) of those it reads
        for q in range(P):
            blocks, starts = order.blocks(self.epoch, q)
            for k, pieces in enumerate(blocks):
                lo, hi = self._window(starts, k)
                if lo < hi:
                    busy.append((q, k))
                else:
                    idle.append(pieces)
        rng = np.random.default_rng([order.seed, self.epoch, self.stream, self.position, self.TAG, 1])
        if idle:
            pieces = np.concatenate(idle)
            for shard, lo, hi in pieces[rng.permutation(len(pieces))].tolist():
                first = lo + (self.stream - int(order.offsets[shard]) - lo) % P  # global index = stream (mod P)
                inners = rng.permutation(np.arange(first, hi, P, dtype=np.int64))
                shards = np.full(len(inners), shard, dtype=np.int64)
                keep = ~self.known_bad(shards, inners)
                yield from self._emit(shards[keep], inners[keep])
        for i in rng.permutation(len(busy)).tolist():
            q, k = busy[i]
            if q != self.stream:  # (this stream's own: its near sequences, used up already)
                shards, inners = self._near_sequence(q, k)
                yield from self._emit(*self._mine(shards[self.reserve:], inners[self.reserve:]))
