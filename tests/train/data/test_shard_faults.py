"""Shards as other tools make them (issue 23, rows 2-5): keys with dots, compressed tars, images the ingestion
would have normalised (deep colour, float, EXIF orientation, transparency), a shard listed but missing.

Each row's own input and others of the same kind. References are independent of the code under test:
webdataset's own grouping, the plain folder read before compression, the ingestion's fetch-front normaliser
followed by img2dataset's own Resizer (what ``make shards`` would have stored), counts by hand.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import InputError
from common.shard_folder import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from pipeline.__main__ import main as pipeline_main
from train.config import DataConfig
from train.data import loader as data_lib
from train.evaluate.data import EvalInputError, iter_samples


def batches(folder, tiny, rank=0, world=1, end=6, batch=16, streams=4, window=2, cache=None):
    cfg = DataConfig(path=str(folder), global_batch_size=batch, num_workers=0, streams=streams,
                     shuffle_window=window, cache_dir=str(cache or Path(folder).parent / f"cache-{Path(folder).name}"))
    return list(data_lib.build_loader(cfg, rank, world, 7, 0, end, *tiny))


def write_tar(path: Path, members: list) -> Path:
    """A tar of ``(name, bytes)`` members in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def one_shard_dataset(folder: Path, members: list, n: int) -> Path:
    """A hand-written manifest (path + count, no sample index) over one tar: the way users point at raw shards."""
    write_tar(folder / "train" / "000000.tar", members)
    write_manifest(folder, Manifest(splits={"train": SplitInfo(shards=[ShardInfo("train/000000.tar", n)])}))
    return folder


def index(*args) -> int:
    return pipeline_main(["index", *map(str, args)])


# ---------------------------------------------------------------- row 2: keys with dots
DOTTED = {  # the row's input (dated file names) and others of its kind
    "dated": lambda i: [(f"2024.05.12_{i:06d}.jpg", jpeg(i)), (f"2024.05.12_{i:06d}.txt", b"a caption")],
    "versioned": lambda i: [(f"img.v{i}.png", jpeg(i)), (f"img.v{i}.txt", b"a caption")],
    "upper case": lambda i: [(f"photo.{i:03d}.JPG", jpeg(i)), (f"photo.{i:03d}.TXT", b"a caption")],
}


@pytest.mark.parametrize("kind", sorted(DOTTED))
def test_keys_with_dots_are_refused_in_one_line_by_index_loader_and_evaluator(kind, tiny, tmp_path, capsys):
    import webdataset as wds

    members = [m for i in range(4) for m in DOTTED[kind](i)]
    folder = one_shard_dataset(tmp_path / "ds", members, 4)
    tar = folder / "train" / "000000.tar"
    # The reference: webdataset keys end at the first dot of the file name, so the 4 samples run together.
    assert len(list(wds.WebDataset(str(tar), shardshuffle=False))) == 1

    assert index("--shards", tar.parent, "--out", tmp_path / "index") == 2  # "no usable shard": its only one
    skipped = [line for line in capsys.readouterr().err.splitlines() if "dots" in line]
    assert len(skipped) == 1 and "000000.tar" in skipped[0], skipped
    with pytest.raises(InputError) as err:  # the loader says so at start, not after an epoch of skips
        batches(folder, tiny, end=1, batch=4, streams=1)
    assert "\n" not in str(err.value) and "000000.tar" in str(err.value) and "dots" in str(err.value)
    with pytest.raises(EvalInputError) as err:
        list(iter_samples(folder, "train"))
    assert "\n" not in str(err.value) and "dots" in str(err.value)


def test_dots_in_folders_and_multi_part_extensions_beside_an_image_are_plain_samples(tiny, tmp_path):
    """What is not the fault: ``dir.v2/KEY.jpg`` and ``KEY.seg.png`` beside ``KEY.jpg`` group as webdataset does."""
    import webdataset as wds

    members = [m for i in range(4) for m in [(f"set.v2/{i:04d}.jpg", jpeg(i)), (f"set.v2/{i:04d}.seg.png", b"x"),
                                              (f"set.v2/{i:04d}.txt", f"caption {i}".encode())]]
    folder = one_shard_dataset(tmp_path / "ds", members, 4)
    reference = [s["__key__"] for s in wds.WebDataset(str(folder / "train" / "000000.tar"), shardshuffle=False)]
    assert len(reference) == 4
    (batch,) = batches(folder, tiny, end=1, batch=4, streams=1)  # the loader's keys are the file names' (basename)
    assert sorted(batch["keys"]) == sorted(k.rsplit("/", 1)[-1] for k in reference) and batch["skipped"] == 0
    assert [s.key.rsplit("/", 1)[-1] for s in iter_samples(folder, "train")] == sorted(batch["keys"])


# ---------------------------------------------------------------- row 3: compressed shards
COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


def compressed_copy(src: Path, dest: Path, compression: str, suffix: str) -> Path:
    """``src`` with every train shard compressed (named ``*{suffix}``) and no sample indexes, as downloaded."""
    shutil.copytree(src, dest)
    manifest = read_manifest(dest)
    for info in manifest.splits["train"].shards:
        raw = (dest / info.path).read_bytes()
        (dest / info.path).unlink()
        info.path = info.path[:-4] + suffix
        info.index = ""
        (dest / info.path).write_bytes(COMPRESS[compression](raw))
    write_manifest(dest, manifest)
    return dest


@pytest.mark.parametrize("compression,suffix", [("gzip", ".tar.gz"), ("bzip2", ".tar.bz2"), ("xz", ".tar.xz"),
                                                ("gzip", ".tar")])  # the last: a gzip stream under a tar's name
def test_compressed_shards_train_evaluate_and_index_as_the_plain_ones(digits, tiny, tmp_path, compression, suffix):
    folder = compressed_copy(digits, tmp_path / "c", compression, suffix)
    plain, packed = batches(digits, tiny, cache=tmp_path / "cache0"), batches(folder, tiny)
    for x, y in zip(plain, packed, strict=True):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"]) and y["skipped"] == 0
    assert [(s.key, s.caption) for s in iter_samples(folder, "train")] == \
        [(s.key, s.caption) for s in iter_samples(digits, "train")]
    assert index("--shards", folder / "train", "--out", tmp_path / "index") == 0
    indexed = read_manifest(tmp_path / "index").split("train")
    assert indexed.num_samples == 96 and len(indexed.shards) == 6
    for x, y in zip(plain, batches(tmp_path / "index", tiny), strict=True):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"])


def test_a_compression_no_reader_decompresses_is_one_line_everywhere(digits, tiny, tmp_path, capsys):
    """zstd (magic bytes 28 b5 2f fd), whatever the file is called."""
    folder = compressed_copy(digits, tmp_path / "z", "gzip", ".tar.zst")
    for info in read_manifest(folder).splits["train"].shards:
        (folder / info.path).write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))
    with pytest.raises(InputError) as err:
        batches(folder, tiny, end=1)
    assert "\n" not in str(err.value) and "zstd" in str(err.value)
    with pytest.raises(EvalInputError) as err:
        list(iter_samples(folder, "train"))
    assert "\n" not in str(err.value) and "zstd" in str(err.value)
    assert index("--shards", folder / "train", "--out", tmp_path / "index") == 2  # "no usable shard"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "zstd" in lines[0] and "000000.tar.zst" in lines[0], lines  # none usable: one line


# ---------------------------------------------------------------- row 4: pixels as the ingestion stores them
def png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_jpeg(orientation: int) -> bytes:
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[:2, :3] = 255  # a white corner shows which way the pixels were turned
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(pixels), "JPEG", quality=100, exif=exif.tobytes())


def deep_cases() -> dict:
    rng = np.random.default_rng(3)
    alpha = rng.integers(0, 256, (5, 7)).astype(np.uint8)
    colour = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    palette = Image.fromarray(colour).convert("P")
    return {
        "16-bit grey": png(rng.integers(0, 65536, (5, 7)).astype(np.uint16)),
        "16-bit colour": png(rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)),
        "16-bit colour + alpha": png(rng.integers(0, 65536, (5, 7, 4)).astype(np.uint16)),
        "8-bit colour + alpha": png(np.dstack([colour, alpha])),
        "float TIFF": pil_bytes(Image.fromarray(rng.random((5, 7)).astype(np.float32) * 1.2 - 0.1, "F"), "TIFF"),
        **{f"EXIF orientation {o}": exif_jpeg(o) for o in (3, 6, 8)},
        "palette + transparency": pil_bytes(palette, "PNG", transparency=palette.getpixel((0, 0))),
    }


def stored_by_the_ingestion(data: bytes) -> np.ndarray:
    """RGB pixels ``make shards`` stores for ``data``: the fetch front's normaliser, then img2dataset's own
    Resizer (no resize, lossless PNG out)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    from pipeline.stages.fetch import normalize_image

    out, *_, err = Resizer(64, "no", False, encode_format="png", encode_quality=1)(io.BytesIO(normalize_image(data)))
    assert err is None, err
    return np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))


@pytest.mark.parametrize("case", sorted(deep_cases()))
def test_the_decoder_gives_the_pixels_the_ingestion_would_store(case, tmp_path):
    from train.data.decode import decode_image

    data = deep_cases()[case]
    expected = stored_by_the_ingestion(data)
    got = np.asarray(decode_image(data).convert("RGB"))
    tolerance = 2 if data[:2] == b"\xff\xd8" else 0  # JPEG: PIL's and cv2's libjpeg builds may round apart
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= tolerance, case
    # ...and PIL alone would not have given them (the fault: clipped, high byte, sideways or black behind alpha)
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert naive.shape != expected.shape or np.abs(naive.astype(int) - expected).max() > tolerance, case


# ---------------------------------------------------------------- row 5: a shard listed but missing
def epoch_uses(folder, tiny, steps, world=1):
    """Keys of each global batch over ``steps`` steps (ranks' shares joined) and the skipped count."""
    per_rank = [batches(folder, tiny, rank=r, world=world, end=steps) for r in range(world)]
    return [sum((rank[t]["keys"] for rank in per_rank), []) for t in range(steps)], \
        sum(b["skipped"] for rank in per_rank for b in rank)


@pytest.mark.parametrize("missing", [(1,), (0, 1), (2, 5)])  # one shard; a whole shuffle window; two windows
def test_substitutes_for_a_missing_shard_spread_over_the_block_never_twice_in_a_batch(digits, tiny, tmp_path, missing):
    folder = tmp_path / "m"
    shutil.copytree(digits, folder)
    for shard in missing:
        (folder / "train" / f"{shard:06d}.tar").unlink()
    keys, skipped = epoch_uses(folder, tiny, 12, world=2)  # two epochs of 6 steps of 16
    assert skipped == 2 * 16 * len(missing)  # each missing sample counted once per epoch
    assert all(len(b) == 16 and len(set(b)) == 16 for b in keys), keys  # full, and no sample twice in a batch
    readable = 96 - 16 * len(missing)
    for epoch in range(2):
        uses = Counter(k for b in keys[6 * epoch:6 * epoch + 6] for k in b)
        extra = {k: n - 1 for k, n in uses.items() if n > 1}
        assert len(uses) == readable and sum(extra.values()) == 16 * len(missing)  # every readable one, once at least
        # Spread (train/data/shard_order.py, Substitutes): substitutes are drawn from the slot's shuffle block, so a
        # block with m unreadable of S samples gives its readable ones m / (S - m) extra uses on average (here up to
        # 2: blocks of 24, 16 missing). The old next-readable rule put every unreadable neighbour's slot on the
        # same sample: 16 extra uses of one sample per missing shard and epoch.
        assert max(extra.values()) <= 4 and len(extra) >= sum(extra.values()) / 4, sorted(extra.values())
