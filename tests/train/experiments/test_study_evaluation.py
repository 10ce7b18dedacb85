"""The study's evaluation is `train.evaluate`'s: same numbers and keys on the same images.

The reference is the evaluator itself (``train.evaluate.core.evaluate``) reading a shard folder (sklearn
digits, tests/harness/data_fixtures.py) and corrupting on the fly; the study gets the same images as
in-memory splits, its corrupted copies made once by ``lib._corrupted`` with the shards' keys. The digits
shards hold RGB JPEGs of grey scans; the evaluator sees them as the grey ("L") images the Fashion-MNIST
demo shards hold (PNG, mode L), since Gaussian noise draws per channel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.demo.source import CLASSNAMES
from tests.harness.data_fixtures import make_digits_dataset
from train.evaluate.config import EvalConfig
from train.evaluate.core import evaluate
from train.evaluate.data import Sample, iter_samples
from train.experiments.study import evaluation, lib


def split_of(folder, split: str):
    """(Split of grey uint8 images, their shard keys): the digits JPEGs are grey, so R = G = B and L is exact."""
    samples = list(iter_samples(folder, split))
    rgb = [np.asarray(s.image.convert("RGB")) for s in samples]
    assert all((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all() for a in rgb)
    images = torch.from_numpy(np.stack([a[..., 0] for a in rgb]))
    return lib.Split(images, torch.tensor([s.label for s in samples]), [s.caption for s in samples]), \
        [s.key for s in samples]


def leaves(tree, prefix=""):
    """{dotted key path: value} of every leaf of a nested result."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def grey_samples(folder, split, max_samples=0, storage_options=None):
    for s in iter_samples(folder, split, max_samples, storage_options):
        yield Sample(s.key, s.image.convert("L"), s.label, s.caption)


def test_study_evaluation_equals_the_evaluator(tmp_path, monkeypatch):
    import train.evaluate.core
    import train.evaluate.datasets

    monkeypatch.setattr(train.evaluate.core, "iter_samples", grey_samples)       # the reference splits
    monkeypatch.setattr(train.evaluate.datasets, "iter_samples", grey_samples)   # the evaluated split
    folder = make_digits_dataset(tmp_path / "digits", n_train=96, n_val=48, shard_size=32)
    train_split, _ = split_of(folder, "train")
    test, keys = split_of(folder, "val")
    data = {"pretrain": train_split, "val": test, "test": test}
    for corruption, severity in lib.SHIFTS:
        copies = lib._corrupted(test.images.numpy(), keys, [(corruption, severity)] * len(keys))
        data[f"test/{corruption}/{severity}"] = lib.Split(torch.from_numpy(copies), test.labels, test.captions)
    torch.manual_seed(0)
    model, preprocess, tokenizer = lib.new_model("cpu")
    model.eval()
    ours = evaluation.evaluate_model(model, tokenizer, preprocess, data, reference_size=64)
    cfg = EvalConfig(dataset=str(folder), split="val", classnames=list(CLASSNAMES), reference_dataset=str(folder),
                     reference_split="train", reference_max_samples=64, calibration_split="val",
                     batch_size=evaluation.BATCH)
    theirs = evaluate(model, preprocess.eval_transform, tokenizer, cfg)
    mine, reference = leaves(ours), leaves(theirs)
    # Where the images came from differs (a shard folder's val split here, the study's in-memory test split).
    ignored = {"seconds", "dataset.folder", "dataset.split", "dataset.format"}
    missing = set(reference) - set(mine) - ignored
    assert not missing, sorted(missing)    # every key the evaluator writes, with the evaluator's names
    assert {"retrieval_label.i2t_R@1", "robustness.shifted_ece"} <= set(mine)
    compared = 0
    for key, expected in reference.items():
        if key in ignored or isinstance(expected, str):
            assert key in ignored or mine[key] == expected, key
            continue
        assert mine[key] == pytest.approx(expected, rel=1e-5, abs=1e-6, nan_ok=True), key
        compared += 1
    assert compared > 12 * 20    # clean, calibration bins and each of the 12 corrupted copies
