"""train/data/decode.py: the one member lookup and image decoder of the trainer's loader and the evaluator.

References are independent of the code under test: webdataset's own grouping for the extension case rule,
PIL on the original bytes for ordinary images, numpy arithmetic by hand (round(v / 257)) and the ingestion's
own normaliser (pipeline/stages/fetch.py) for 16-bit PNGs.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.shard_folder import Manifest, ShardInfo, SplitInfo, write_manifest
from train.config import DataConfig
from train.data import loader as data_lib
from train.data.decode import decode_image, image_member
from train.evaluate.data import iter_samples

N = 8


def jpeg(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((12, 10, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")    # PIL writes a 16-bit greyscale PNG
    return buf.getvalue()


def write_dataset(folder: Path, members: list[dict], image_field: str = "jpg") -> Path:
    """One shard of samples (``{"KEY.EXT": bytes}`` each, names as given) and a manifest recording it."""
    (folder / "train").mkdir(parents=True)
    with tarfile.open(folder / "train" / "000000.tar", "w") as tar:
        for sample in members:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    fields = {"image": image_field, "caption": "txt", "metadata": "json"}
    write_manifest(folder, Manifest(splits={"train": SplitInfo(shards=[ShardInfo("train/000000.tar", len(members))])},
                                    fields=fields))
    return folder


def trainer_images(folder: Path, cache: Path) -> tuple[list[str], np.ndarray, int]:
    """Keys, RGB pixels (N, H, W, 3) and skipped count of one global batch of all N samples, through the loader."""
    cfg = DataConfig(path=str(folder), global_batch_size=N, num_workers=0, streams=1, shuffle_window=1,
                     cache_dir=str(cache))
    as_array = lambda img: torch.from_numpy(np.array(img))    # noqa: E731 (the "transform": pixels as they are)
    tokens = lambda texts: torch.tensor([[len(texts[0])]])    # noqa: E731
    (batch,) = list(data_lib.build_loader(cfg, 0, 1, 0, 0, 1, as_array, tokens))
    return batch["keys"], batch["image"].numpy(), batch["skipped"]


def sample(i: int, ext: str, data: bytes, text_ext: str = "txt", meta_ext: str = "json") -> dict:
    key = f"{i:014d}"
    return {f"{key}.{ext}": data, f"{key}.{text_ext}": f"caption {i}".encode(),
            f"{key}.{meta_ext}": json.dumps({"label": i % 3}).encode()}


def test_upper_case_extensions_are_members_for_trainer_and_evaluator(tmp_path):
    import webdataset as wds

    images = {f"{i:014d}": jpeg(i) for i in range(N)}
    folder = write_dataset(tmp_path / "ds", [sample(i, "JPG", images[f"{i:014d}"], "TXT", "Json")
                                             for i in range(N)])
    # The rule's reference: webdataset groups KEY.JPG / KEY.TXT / KEY.Json as the jpg, txt and json members.
    grouped = list(wds.WebDataset(str(folder / "train" / "000000.tar"), shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in grouped] == [["jpg", "json", "txt"]] * N
    assert image_member({"__key__": "k", "JPG": b""}) == "JPG" and image_member({"Png": b""}, "jpg") == "Png"

    reference = {k: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for k, b in images.items()}
    keys, pixels, skipped = trainer_images(folder, tmp_path / "cache")
    assert skipped == 0 and sorted(keys) == sorted(images)
    for key, image in zip(keys, pixels):
        assert np.array_equal(image, reference[key]), key
    evaluated = list(iter_samples(folder, "train"))
    assert [s.key for s in evaluated] == sorted(images)
    for i, s in enumerate(evaluated):
        assert np.array_equal(np.asarray(s.image.convert("RGB")), reference[s.key])
        assert (s.caption, s.label) == (f"caption {i}", i % 3)


def test_16_bit_png_is_scaled_like_the_ingestion_not_clipped(tmp_path):
    from pipeline.stages.fetch import normalize_image

    rng = np.random.default_rng(0)
    values = [np.concatenate([[0, 1, 128, 129, 255, 256, 1000, 32767, 32768, 65534, 65535],
                              rng.integers(0, 65536, 13)]).reshape(4, 6) for _ in range(N)]
    expected = [np.rint(v / 257.0).astype(np.uint8) for v in values]    # by hand: the 8-bit value nearest v/257
    assert any((v > 255).any() for v in values)    # PIL's own convert would clip these to 255
    for v, e in zip(values, expected):
        decoded = decode_image(png16(v))
        assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), e)
        # the ingestion's fetch front turns the same bytes into these pixels too
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(normalize_image(png16(v))))), e)

    folder = write_dataset(tmp_path / "ds", [sample(i, "png", png16(v)) for i, v in enumerate(values)],
                           image_field="png")
    keys, pixels, skipped = trainer_images(folder, tmp_path / "cache")
    assert skipped == 0
    for key, image in zip(keys, pixels):
        e = expected[int(key)]
        assert np.array_equal(image, np.stack([e, e, e], axis=-1)), key
    for s, e in zip(iter_samples(folder, "train"), expected):
        assert np.array_equal(np.asarray(s.image), e)


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])  # with transparency: test_shard_faults.py (onto white)
def test_8_bit_images_decode_as_pil_reads_them(mode):
    pixels = (np.random.default_rng(1).random((6, 5, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    reference = Image.open(io.BytesIO(buf.getvalue()))
    decoded = decode_image(buf.getvalue())
    assert decoded.mode == reference.mode == mode
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(reference.convert("RGB")))
