"""The training order of one dataset or of a mixture (``data.sources``): a pure function of (seed, step, sources).

One dataset is one ``ShardOrder`` (train/data/shard_order.py) and everything below reduces to it exactly. A
mixture of S sources shares its P canonical streams among them:

* Each stream takes c = B / P samples per step; source i takes n_i of them, the largest-remainder
  (Hamilton) apportionment of c by the normalised weights w_i / sum(w), ties to the earlier source. The
  counts are fixed for the run and the same in every stream and step, so every global batch holds exactly
  P * n_i samples of source i: the weight's share to within 1/c (B = 32768, P = 64: 1/512). A source whose
  n_i would be 0 makes the auto P smaller (fewer, longer streams); with P given it is one error line.
* Source i has its own ShardOrder over its own shards (global batch P * n_i, the run's P and shuffle
  window), so it runs through its own epochs: step t is in epoch ``t // steps_per_epoch_i`` of source i. A
  small source repeats while a large one goes on; nothing ties the sources' epochs together.
* Global batch t, in order: for each stream p, the n_0 samples of source 0, then the n_1 of source 1, ...
  Rank r of W reads streams [r P/W, (r+1) P/W) of every source: a contiguous slice of that order, so
  2 ranks x b see exactly the samples of 1 rank x 2b, and a resume on another world size (W dividing P)
  continues the same global order.

Each source's shard order is seeded with the run seed (its permutations are of its own shards), and each
sample's augmentation with (seed, epoch, index, source) (train.data.loader.sample_seed).
"""
from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Dict, List, Sequence

from train.data.shard_order import MAX_AUTO_PARTITIONS, ShardOrder, auto_partitions, shards_sha1

if TYPE_CHECKING:
    from common.shard_folder import Manifest
    from train.config import DataConfig


def apportion(weights: Sequence[float], total: int) -> List[int]:
    """Largest-remainder apportionment of ``total`` items by ``weights`` (> 0): integers summing to ``total``,
    each floor(quota) or floor(quota) + 1 where quota = total * w / sum(w); remainders go to the largest
    fractional parts, ties to the lower index. Exact (rational) arithmetic: 2/3 ties stay ties."""
    exact = [Fraction(w) for w in weights]
    quotas = [total * w / sum(exact) for w in exact]
    counts = [int(q) for q in quotas]  # floor: quotas are >= 0
    rest = total - sum(counts)
    for i in sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))[:rest]:
        counts[i] += 1
    return counts


class DataOrder:
    """The sources' ShardOrders of a run and how many samples each stream takes from each (module doc)."""

    def __init__(self, orders: Sequence[ShardOrder], names: Sequence[str], weights: Sequence[float]):
        self.orders, self.names, self.weights = list(orders), list(names), [float(w) for w in weights]
        self.partitions, self.window = self.orders[0].partitions, self.orders[0].window
        self.counts = [o.per_stream for o in self.orders]  # n_i
        self.per_stream = sum(self.counts)                  # c

    @property
    def mixed(self) -> bool:
        return len(self.orders) > 1

    @property
    def num_samples(self) -> int:
        return sum(o.num_samples for o in self.orders)

    @property
    def num_shards(self) -> int:
        return sum(len(o.sizes) for o in self.orders)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch of the source that finishes its epoch first (the only one, unmixed)."""
        return min(o.steps_per_epoch for o in self.orders)

    def rank_streams(self, rank: int, world_size: int) -> range:
        return self.orders[0].rank_streams(rank, world_size)

    def state_dict(self) -> dict:
        """What the order depends on besides (seed, step). One dataset: its ShardOrder's, as before mixtures."""
        if not self.mixed:
            return self.orders[0].state_dict()
        return {"sources": [{"name": n, "per_stream": o.per_stream, **o.state_dict()}
                            for n, o in zip(self.names, self.orders)]}

    def check_resume(self, saved: dict) -> None:
        """ValueError naming what differs when a checkpoint was trained on another order (module doc)."""
        if not self.mixed and "sources" not in saved:
            return self.orders[0].check_resume(saved)
        was = saved.get("sources", [saved])
        if len(was) != len(self.orders):
            raise ValueError(f"the checkpoint was trained on {len(was)} data source(s), this run has "
                             f"{len(self.orders)}; resume with the same data.sources")
        for i, (old, order, name) in enumerate(zip(was, self.orders, self.names)):
            try:
                if old.get("per_stream", order.per_stream) != order.per_stream:
                    raise ValueError(f"the checkpoint took {old['per_stream']} samples per stream from it, this "
                                     f"run {order.per_stream} (data.sources weights changed)")
                order.check_resume(old)
            except ValueError as err:
                raise ValueError(f"data source {i} ({name}): {err}") from None

    def epochs(self, step: int) -> List[int]:
        """Each source's epoch at 0-based ``step``."""
        return [o.epoch_of(step) for o in self.orders]

    def progress_record(self, steps_done: int) -> Dict[str, float]:
        """metrics.jsonl's per-source fields after ``steps_done`` steps: ``data/NAME/samples`` (drawn from the
        source so far, over all ranks) and ``data/NAME/epoch`` (of the last step); empty when unmixed."""
        if not self.mixed or steps_done < 1:
            return {}
        out: Dict[str, float] = {}
        for name, order, epoch in zip(self.names, self.orders, self.epochs(steps_done - 1)):
            out[f"data/{name}/samples"] = float(steps_done * order.per_stream * order.partitions)
            out[f"data/{name}/epoch"] = float(epoch)
        return out

    def describe(self) -> str:
        """One log line: samples, shards, streams, and each source's share and epoch length."""
        head = (f"{self.num_samples} samples in {self.num_shards} shards, {self.partitions} partitions, "
                f"window {self.window} shards")
        if not self.mixed:
            return f"{head}, {self.steps_per_epoch} steps per epoch"
        parts = [f"{n}: {o.per_stream * o.partitions} per batch ({share:.1%}), {o.steps_per_epoch} steps per epoch"
                 for n, o, share in zip(self.names, self.orders, self.shares())]
        return f"{head}; " + "; ".join(parts)

    def shares(self) -> List[float]:
        """Each source's realised share of every global batch, n_i / c."""
        return [n / self.per_stream for n in self.counts]

    def share_warning(self, tolerance: float = 0.1) -> str:
        """A line when a realised share is off its weight's share by more than ``tolerance`` (relative), which
        happens when c = B / P is small (tiny batches); '' otherwise."""
        wanted = [w / sum(self.weights) for w in self.weights]
        if all(abs(got - want) <= tolerance * want for got, want in zip(self.shares(), wanted)):
            return ""
        pairs = ", ".join(f"{n} {got:.1%} (weight {want:.1%})" for n, got, want in zip(self.names, self.shares(), wanted))
        return (f"data.sources: the batch shares are {pairs}: each of the {self.partitions} streams takes "
                f"{self.per_stream} samples, apportioned by largest remainder; a larger data.global_batch_size or a "
                "smaller data.streams gives finer shares")


def make_data_order(manifests: Sequence["Manifest"], data: "DataConfig", seed: int) -> DataOrder:
    """The run's DataOrder: one manifest per ``data.datasets()`` entry, in that order. ValueError (one line) when
    the batch cannot be shared: P not dividing B, or a source that gets no sample of a stream or cannot fill
    one step. The one place that reads the order's fields of the DataConfig."""
    sources = data.datasets()
    shards = [m.split(src.split).shards for m, src in zip(manifests, sources)]
    sizes = [[s.num_samples for s in split] for split in shards]
    batch, weights = data.global_batch_size, [s.weight for s in sources]
    if data.streams:
        partitions = data.streams
    else:  # auto: also small enough that every source gets at least one sample of each stream
        partitions = auto_partitions(min(len(s) for s in sizes), batch, MAX_AUTO_PARTITIONS)
        while partitions > 1 and 0 in apportion(weights, batch // partitions):
            partitions //= 2
    if partitions < 1 or batch % partitions:
        raise ValueError(f"data.streams={partitions} must divide data.global_batch_size={batch}")
    counts = apportion(weights, batch // partitions)
    orders = []
    for src, n, shard_sizes, split in zip(sources, counts, sizes, shards):
        if n == 0:
            raise ValueError(f"data source {src.name} (weight {src.weight:g}) gets none of the "
                             f"{batch // partitions} samples each of the {partitions} streams takes per step; raise "
                             "data.global_batch_size or its weight, or lower data.streams")
        try:
            orders.append(ShardOrder(shard_sizes, n * partitions, partitions, data.shuffle_window, seed,
                                     shards_sha1(split)))
        except ValueError as err:
            if len(sources) == 1:
                raise
            raise ValueError(f"data source {src.name}: {err}") from None
    return DataOrder(orders, [s.name for s in sources], weights)

