"""Data mixtures (train/data/mixture.py) through the real loader: shares, epochs, rank slices, resume checks.

Sources are told apart by their keys: the digits folder's train and val splits hold disjoint key ranges, and a
second folder's val split a third. References: an exact-arithmetic apportionment, the one-dataset loader.
"""
from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from common.config_loader import load_config
from common.errors import ConfigError
from tests.harness.data_fixtures import make_digits_dataset
from train.config import DataConfig, DataSource, TrainConfig
from train.data import loader as data_lib
from train.data.mixture import apportion, make_data_order


def hamilton(weights, total):
    """Largest remainder in exact arithmetic: the reference for ``apportion``."""
    quotas = [Fraction(total) * Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    counts = [q.numerator // q.denominator for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def test_apportion_is_largest_remainder():
    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.choice([1, 2, 3, 5, 7, 0.5, 0.25, 10]) for _ in range(rng.randint(1, 5))]
        total = rng.randint(1, 64)
        assert apportion(weights, total) == hamilton(weights, total), (weights, total)
    assert apportion([3, 1], 8) == [6, 2] and apportion([1, 1, 1], 8) == [3, 3, 2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    a = make_digits_dataset(root / "a", n_train=96, n_val=32, shard_size=16)             # keys 0..95 | 96..127
    b = make_digits_dataset(root / "b", n_train=200, n_val=48, shard_size=16, seed=1)   # val keys 200..247
    return a, b


def source_of(key: str) -> str:
    k = int(key)
    return "big" if k < 96 else "small" if k < 128 else "other"


def mix_cfg(folders, **kw) -> DataConfig:
    a, b = folders
    sources = [DataSource(path=str(a), weight=3, name="big"), DataSource(path=str(a), weight=2, name="small",
                                                                          split="val"),
               DataSource(path=str(b), weight=1, name="other", split="val")]
    options = dict(global_batch_size=24, streams=2, shuffle_window=2, num_workers=0, cache_dir=str(a.parent / "c"))
    options.update(kw)
    return DataConfig(sources=sources, **options)


def batches(cfg, tiny, rank=0, world=1, start=0, end=12, seed=5):
    return list(data_lib.build_loader(cfg, rank, world, seed, start, end, *tiny))


def test_every_batch_takes_each_sources_share_and_each_source_its_own_epochs(folders, tiny):
    cfg = mix_cfg(folders)
    order = make_data_order(data_lib.read_manifests(cfg), cfg, 5)
    assert order.counts == [6, 4, 2]  # c = 24 / 2 = 12 per stream, weights 3:2:1
    out = batches(cfg, tiny, end=12)
    for b in out:
        # stream-major, then source: [6 big, 4 small, 2 other] x 2 streams
        assert [source_of(k) for k in b["keys"]] == (["big"] * 6 + ["small"] * 4 + ["other"] * 2) * 2
        assert b["skipped"] == 0
    # small (32 samples, 8 per step) has 4 steps per epoch; big (96, 12 per step) 8; other (48, 4 per step) 12.
    assert [o.steps_per_epoch for o in order.orders] == [8, 4, 12]
    for name, spe in (("big", 8), ("small", 4), ("other", 12)):
        for epoch in range(12 // spe):
            seen = [k for b in out[epoch * spe:(epoch + 1) * spe] for k in b["keys"] if source_of(k) == name]
            assert len(seen) == len(set(seen)), f"{name} repeats a sample within its epoch {epoch}"
    small = [k for b in out for k in b["keys"] if source_of(k) == "small"]
    assert max(Counter(small).values()) == 3  # 3 epochs of the small source in 12 steps
    record = order.progress_record(12)
    assert record == {"data/big/samples": 144.0, "data/big/epoch": 1.0, "data/small/samples": 96.0,
                      "data/small/epoch": 2.0, "data/other/samples": 48.0, "data/other/epoch": 0.0}


def test_two_ranks_of_b_are_one_rank_of_2b_and_workers_do_not_matter(folders, tiny):
    cfg = mix_cfg(folders)
    one = batches(cfg, tiny, end=6)
    r0, r1 = batches(cfg, tiny, 0, 2, end=6), batches(mix_cfg(folders, num_workers=2), tiny, 1, 2, end=6)
    for a, b0, b1 in zip(one, r0, r1):
        assert a["keys"] == b0["keys"] + b1["keys"]
        assert torch.equal(a["image"], torch.cat([b0["image"], b1["image"]]))
    resumed = batches(cfg, tiny, start=3, end=6)  # resume at step 3: nothing replayed, the same batches
    assert [b["keys"] for b in resumed] == [b["keys"] for b in one[3:]]


def test_one_source_equals_data_path_exactly(folders, tiny):
    a, _ = folders
    plain = DataConfig(path=str(a), global_batch_size=16, streams=2, shuffle_window=2, num_workers=0)
    single = DataConfig(sources=[DataSource(path=str(a), weight=7)], global_batch_size=16, streams=2,
                        shuffle_window=2, num_workers=0)
    for x, y in zip(batches(plain, tiny, end=4), batches(single, tiny, end=4)):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"])
    order = make_data_order(data_lib.read_manifests(single), single, 5)
    assert "sources" not in order.state_dict() and order.progress_record(3) == {}


def test_shares_too_small_for_a_stream_shrink_the_auto_streams_or_fail_in_one_line(folders):
    cfg = mix_cfg(folders, streams=0, global_batch_size=16)
    cfg.sources[2].weight = 0.5  # 3 : 2 : 0.5 of 16 per stream would be 8.7 : 5.8 : 1.5
    order = make_data_order(data_lib.read_manifests(cfg), cfg, 0)
    assert order.partitions * order.per_stream == 16 and min(order.counts) >= 1
    cfg = mix_cfg(folders, streams=8, global_batch_size=16)  # c = 2 for three sources
    with pytest.raises(ValueError, match="data source other .* gets none of the 2 samples"):
        make_data_order(data_lib.read_manifests(cfg), cfg, 0)


def test_resume_refuses_other_weights_or_sources_in_one_line(folders):
    cfg = mix_cfg(folders)
    saved = make_data_order(data_lib.read_manifests(cfg), cfg, 5).state_dict()
    cfg.sources[0].weight = 4  # 4:2:1 of 12 -> 7, 3, 2
    with pytest.raises(ValueError, match=r"data source 0 \(big\).*samples per stream"):
        make_data_order(data_lib.read_manifests(cfg), cfg, 5).check_resume(saved)
    two = mix_cfg(folders)
    two.sources = two.sources[:2]
    with pytest.raises(ValueError, match="3 data source"):
        make_data_order(data_lib.read_manifests(two), two, 5).check_resume(saved)


def test_sources_from_the_command_line_and_their_errors(folders):
    a, b = folders
    cfg = load_config(TrainConfig, None, [f"data.sources=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"])
    assert [(s.path, s.weight, s.name, s.split) for s in cfg.data.datasets()] == [(str(a), 3.0, "a", "train"),
                                                                                  (str(b), 1.0, "b", "train")]
    for bad, message in ((f"data.sources=[{{path: {a}, weight: -1}}]", r"data.sources\[0\].weight"),
                         (f"data.sources=[{{path: {a}}}, {{path: {a}}}]", "two sources share this name"),
                         ("data.sources=[{weight: 2}]", r"data.sources\[0\].path")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, None, [bad])


def test_shares_that_a_small_batch_cannot_hold_are_said_in_one_line(folders):
    cfg = mix_cfg(folders, global_batch_size=8, streams=2)  # c = 4: 3:2:1 -> 2:1:1
    order = make_data_order(data_lib.read_manifests(cfg), cfg, 0)
    assert order.shares() == [0.5, 0.25, 0.25]
    warning = order.share_warning()
    assert "small 25.0% (weight 33.3%)" in warning and "\n" not in warning
    assert make_data_order(data_lib.read_manifests(mix_cfg(folders)), mix_cfg(folders), 0).share_warning() == ""
