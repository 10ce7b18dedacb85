"""The training loader (train/data/loader.py, train/data/shard_order.py): order, exact and elastic resume, bad data,
the shard-format contract (png/webp). Every expectation comes from an independent reference: a naive
re-implementation of the documented order, plain tarfile + PIL reads, or a run with other ranks/workers.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.shard_folder import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from tests.harness.data_fixtures import corrupt_copy, readable_keys, with_sample_indexes
from train.data import loader as data_lib
from train.config import DataConfig
from train.data.shard_order import ShardOrder, auto_partitions


def batches(folder, tiny, rank=0, world=1, start=0, end=9, workers=0, batch=16, partitions=4, window=2, seed=7):
    cfg = DataConfig(path=str(folder), global_batch_size=batch, num_workers=workers, streams=partitions,
                     shuffle_window=window, cache_dir=str(Path(folder).parent / "cache"))
    return list(data_lib.build_loader(cfg, rank, world, seed, start, end, *tiny))


def naive_order(sizes, batch, partitions, window, seed, steps):
    """The documented order, spelled out over explicit sample lists: global batch t -> [(shard, inner)]."""
    c, n = batch // partitions, sum(sizes)
    length = n // partitions
    per_epoch = length // c
    out = []
    for t in range(steps):
        epoch, pos = divmod(t, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(len(sizes))
        sequence = [(int(s), i) for s in perm for i in range(sizes[s])]
        global_batch = []
        for p in range(partitions):
            stream = sequence[p * length:(p + 1) * length]
            pieces = []  # consecutive runs of one shard
            for item in stream:
                if pieces and pieces[-1][0][0] == item[0]:
                    pieces[-1].append(item)
                else:
                    pieces.append([item])
            shuffled = []
            for k in range(0, len(pieces), window):
                block = [x for piece in pieces[k:k + window] for x in piece]
                order = np.random.default_rng([seed, epoch, p, k // window]).permutation(len(block))
                shuffled += [block[i] for i in order]
            global_batch += shuffled[pos * c:(pos + 1) * c]
        out.append(global_batch)
    return out


def test_order_matches_the_documented_construction_on_uneven_shards():
    sizes = list(np.random.default_rng(3).integers(1, 40, size=23))
    order = ShardOrder(sizes, 32, 8, 3, seed=5)
    steps = 2 * order.steps_per_epoch + 3  # crosses two epoch boundaries
    reference = naive_order(sizes, 32, 8, 3, 5, steps)
    for t in range(steps):
        ours = [next(slot.candidates())[:2] for p in range(8) for slot in order.slots(t, p)]
        assert ours == reference[t], t
    # one epoch visits distinct samples, all but fewer than P + B of them
    epoch0 = {x for t in range(order.steps_per_epoch) for x in reference[t]}
    assert len(epoch0) == order.steps_per_epoch * 32 > sum(sizes) - 8 - 32
    # rank streams partition the streams contiguously; W must divide P
    assert [list(order.rank_streams(r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="world size must divide"):
        order.rank_streams(0, 3)
    assert auto_partitions(1000, 48) == 16 and auto_partitions(6, 64) == 4 and auto_partitions(10**5, 4096) == 64


def test_two_ranks_times_b_equal_one_rank_times_2b_for_any_worker_count(digits, tiny):
    one = batches(digits, tiny, workers=0)
    two = [batches(digits, tiny, rank=r, world=2, workers=2) for r in range(2)]
    four = [batches(digits, tiny, rank=r, world=4, workers=1) for r in range(4)]
    assert len(one) == 9 and [b["step"] for b in two[0]] == list(range(9))
    for step, a in enumerate(one):
        assert a["keys"] == two[0][step]["keys"] + two[1][step]["keys"], step
        assert a["keys"] == [k for r in range(4) for k in four[r][step]["keys"]], step
        assert torch.equal(a["image"], torch.cat([two[0][step]["image"], two[1][step]["image"]]))  # same augmentations
        assert torch.equal(a["text"], torch.cat([b[step]["text"] for b in four]))
    # 96 samples / 16 = 6 steps per epoch: each epoch visits every sample once, the next in a new order
    epoch0 = [k for b in one[:6] for k in b["keys"]]
    assert len(set(epoch0)) == 96 and [k for b in one[6:9] for k in b["keys"]] != epoch0[:48]


def test_resume_at_any_step_on_other_ranks_and_workers_continues_the_same_order(digits, tiny):
    reference = batches(digits, tiny, end=9, workers=1)
    for start, world, workers in ((4, 2, 3), (7, 4, 0), (5, 1, 2)):
        resumed = [batches(digits, tiny, rank=r, world=world, start=start, end=9, workers=workers)
                   for r in range(world)]
        for i, a in enumerate(reference[start:]):
            assert a["keys"] == [k for r in range(world) for k in resumed[r][i]["keys"]], (start, world)
            assert torch.equal(a["image"], torch.cat([resumed[r][i]["image"] for r in range(world)]))


def test_corrupt_samples_and_a_truncated_shard_are_skipped_counted_and_batches_stay_full(digits, tiny, tmp_path):
    bad = corrupt_copy(digits, tmp_path / "bad")
    good = readable_keys(bad)
    # From the damage corrupt_copy did: one zeroed JPEG in shard 0, and in shard 1 (cut to a third) every
    # sample whose jpg or txt member ends past the cut.
    with tarfile.open(digits / "train" / "000001.tar") as tar:
        cut = (digits / "train" / "000001.tar").stat().st_size // 3
        ends = {}
        for m in tar:
            if m.name.endswith((".jpg", ".txt")):
                key = m.name.split(".", 1)[0]
                ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    lost_in_cut = sum(end > cut for end in ends.values())
    assert len(ends) == 16 and 0 < lost_in_cut < 16
    assert len(good) == 96 - 1 - lost_in_cut
    clean = batches(digits, tiny, end=6)  # same order: the keys each slot would hold without damage
    one = batches(bad, tiny, end=6, workers=2)
    two = [batches(bad, tiny, rank=r, world=2, end=6, workers=1) for r in range(2)]
    expected_skips = sum(k not in good for b in clean for k in b["keys"])
    assert expected_skips == 96 - len(good)  # the 6 steps of 16 are one epoch: each damaged sample once
    assert sum(b["skipped"] for b in one) == expected_skips
    for step, b in enumerate(one):
        assert len(b["keys"]) == 16 and b["image"].shape[0] == 16  # substitutes keep every batch full
        assert set(b["keys"]) <= good
        assert b["keys"] == two[0][step]["keys"] + two[1][step]["keys"]  # and rank-count independent
        kept = [k for k, ref in zip(b["keys"], clean[step]["keys"]) if ref in good]
        assert kept == [ref for ref in clean[step]["keys"] if ref in good]  # readable slots are unchanged


def test_a_missing_or_truncated_shard_logs_one_line_per_shard_and_counts_every_sample(digits, tiny, tmp_path, caplog):
    """Fresh-user report: a deleted shard logged one warning per skipped sample (thousands per epoch at
    real shard sizes). Now one line per shard (and kind of damage); the count stays exact: one epoch
    (6 steps of 16) meets each of the deleted shard's 16 samples once."""
    missing = tmp_path / "missing"
    shutil.copytree(digits, missing)
    (missing / "train" / "000001.tar").unlink()
    with caplog.at_level("WARNING", logger="train.data.loader"):
        got = batches(missing, tiny, end=6)
    assert sum(b["skipped"] for b in got) == 16
    assert all(len(b["keys"]) == 16 for b in got)
    lines = [r.getMessage() for r in caplog.records if r.name == "train.data.loader"]
    assert len(lines) == 1 and "000001.tar" in lines[0] and "unavailable" in lines[0], lines
    caplog.clear()
    bad = corrupt_copy(digits, tmp_path / "bad")  # one zeroed JPEG in shard 0, shard 1 cut to a third
    with caplog.at_level("WARNING", logger="train.data.loader"):
        got = batches(bad, tiny, end=6)
    lines = [r.getMessage() for r in caplog.records if r.name == "train.data.loader"]
    assert sum(b["skipped"] for b in got) == 96 - len(readable_keys(bad))
    heads = [line.split(";")[0] for line in lines]  # "shard S: skipping its KIND samples (...)"
    assert sorted(heads) == sorted(set(heads)) and len(heads) <= 3, lines  # shard 0 corrupt, shard 1 cut + corrupt
    assert 96 - len(readable_keys(bad)) > len(heads) + 3  # many more samples skipped than lines logged


def reencode(src: Path, dest: Path, ext: str) -> Path:
    """The digits folder with its images re-encoded as ``ext`` (png or webp, lossless) and recorded so."""
    fmt = {"png": "PNG", "webp": "WEBP"}[ext]
    manifest = read_manifest(src)
    splits = {}
    for name, split in manifest.splits.items():
        shards = []
        for info in split.shards:
            out = dest / info.path
            out.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(Path(src) / info.path) as tin, tarfile.open(out, "w") as tout:
                for m in tin:
                    data = tin.extractfile(m).read()
                    key, member_ext = m.name.split(".", 1)
                    if member_ext == "jpg":
                        buffer = io.BytesIO()
                        Image.open(io.BytesIO(data)).save(buffer, format=fmt, lossless=True)
                        data, m = buffer.getvalue(), tarfile.TarInfo(f"{key}.{ext}")
                    m.size = len(data)
                    tout.addfile(m, io.BytesIO(data))
            shards.append(ShardInfo(path=info.path, num_samples=info.num_samples, image_ext=ext, sample_hash="sha256"))
        splits[name] = SplitInfo(shards=shards)
    shutil.copy(Path(src) / "classnames.txt", dest / "classnames.txt")
    write_manifest(dest, Manifest(splits=splits))
    return dest


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_png_and_webp_shards_train_and_evaluate_through_the_manifest_contract(digits, tiny, tmp_path, ext):
    from train.evaluate.data import iter_samples

    folder = reencode(digits, tmp_path / ext, ext)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fields"]["image"] == ext and manifest["fields"]["sample_hash"] == "sha256"
    reference = batches(digits, tiny, end=3)
    ours = batches(folder, tiny, end=3)
    for a, b in zip(reference, ours):  # lossless re-encoding: the same pixels through the same order
        assert a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])
    assert sum(b["skipped"] for b in ours) == 0
    samples = list(iter_samples(folder, "val"))
    assert len(samples) == 16 and all(s.image.size == (32, 32) for s in samples)


def test_shards_that_disagree_on_their_hash_are_an_error(tmp_path):
    splits = {"train": SplitInfo(shards=[ShardInfo("a.tar", 1, sample_hash="sha256"), ShardInfo("b.tar", 1,
                                                                                              sample_hash="md5")])}
    with pytest.raises(ValueError, match="disagree"):
        write_manifest(tmp_path, Manifest(splits=splits))


def test_shards_of_mixed_image_formats_named_in_place_read_as_one_dataset(digits, tiny, tmp_path):
    """An index of other tools' shards: each shard keeps its own image extension and its own location (an
    absolute path outside the folder); the reference is the all-jpg folder: same keys, same pixels."""
    png = reencode(digits, tmp_path / "png", "png")
    own, other = read_manifest(digits).split("train").shards, read_manifest(png).split("train").shards
    mixed = [ShardInfo(str(png / o.path) if i % 2 else str(digits / s.path), s.num_samples, image_ext=o.image_ext
                       if i % 2 else "jpg") for i, (s, o) in enumerate(zip(own, other))]
    folder = tmp_path / "index"
    folder.mkdir()
    write_manifest(folder, Manifest(splits={"train": SplitInfo(shards=mixed)}))
    manifest = read_manifest(folder)
    assert manifest.fields["image"] == "jpg" and {s.image_ext for s in manifest.split("train").shards} == {"jpg", "png"}
    assert manifest.shard_paths("train") == [s.path for s in mixed]
    for a, b in zip(batches(digits, tiny, end=4), batches(folder, tiny, end=4)):
        assert a["keys"] == b["keys"] and torch.equal(a["image"], b["image"]) and b["skipped"] == 0


def test_partition_rule_errors_are_clear(digits, tiny):
    with pytest.raises(ValueError, match="world size must divide"):
        batches(digits, tiny, rank=0, world=3, end=1)
    with pytest.raises(ValueError, match="must divide data.global_batch_size"):
        batches(digits, tiny, partitions=3, end=1)


def test_each_rank_reads_its_share_of_the_bytes_once(digits, tiny, tmp_path):
    indexed = with_sample_indexes(digits, tmp_path / "indexed")
    dataset = sum((indexed / s.path).stat().st_size for s in read_manifest(indexed).split("train").shards)
    plain = batches(digits, tiny, end=6)
    for world, workers in ((2, 2), (1, 0)):
        ranks = [batches(indexed, tiny, rank=r, world=world, end=6, workers=workers) for r in range(world)]
        assert [k for s in range(6) for r in ranks for k in r[s]["keys"]] == [k for b in plain for k in b["keys"]]
        for r in ranks:  # one epoch: every sample's bytes once, plus 16-byte index rows
            assert dataset / world * 0.9 < sum(b["bytes_read"] for b in r) <= dataset / world * 1.1, (world, workers)


def test_reshard_writes_the_format_contract(tmp_path):
    import hashlib
    import time

    from common.shard_folder import index_tar, load_sample_index
    from pipeline.stages.reshard import index_path, write_shard

    images, rows = {}, []
    for i in range(5):
        buffer = io.BytesIO()
        Image.new("RGB", (8 + i, 8), (i * 40, 0, 0)).save(buffer, format="PNG")
        images[f"{i:014d}"] = buffer.getvalue()
        rows.append({"row_key": f"{i:014d}", "caption": f"red {i}", "url": f"http://h/{i}.png", "sha256": "x"})
    tar = tmp_path / "train" / "000000.tar"
    digest = write_shard(tar, rows, images, "png", [])
    with tarfile.open(tar) as t:    # webdataset.TarWriter's order: a sample's members sorted by extension
        assert [m.name for m in t][:3] == ["00000000000000.json", "00000000000000.png", "00000000000000.txt"]
        assert {(m.mtime, m.uname, m.gname, m.mode) for m in t} == {(0, "", "", 0o444)}
        assert not any(m.pax_headers for m in t)    # a float mtime would add a pax header per member
    # Byte-deterministic (the manifest's sha256 is stable across reruns): a second write, a moment later.
    assert digest == hashlib.sha256(tar.read_bytes()).hexdigest()
    time.sleep(1.1)
    assert write_shard(tmp_path / "again" / "000000.tar", rows, images, "png", []) == digest
    with open(tar, "rb") as f:
        assert np.array_equal(load_sample_index(index_path(tar).read_bytes()), index_tar(f))
    assert len(index_tar(open(tar, "rb"))) == 5


def test_resume_refuses_a_checkpoint_trained_on_another_order():
    saved = ShardOrder([16] * 6, 16, 4, 2, seed=7).state_dict()  # what trainer_state()["data"] holds
    ShardOrder([16] * 6, 16, 4, 2, seed=7).check_resume(saved)  # same order: fine, whatever W and workers
    for other, what in ((ShardOrder([16] * 6, 16, 2, 2, 7), "partitions 4 -> 2"),
                        (ShardOrder([16] * 6, 16, 4, 3, 7), "window 2 -> 3"),
                        (ShardOrder([16] * 5 + [15], 16, 4, 2, 7), "num_samples 96 -> 95")):
        with pytest.raises(ValueError, match=what):
            other.check_resume(saved)
