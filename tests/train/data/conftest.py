"""Fixtures of the loader tests: the sklearn-digits dataset (96 train samples in 6 shards of 16, 16 val) and
the tiny model's train transform and tokenizer. Module scope: each test file builds its own, once."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.data_fixtures import make_digits_dataset
from train.config import ModelConfig
from train.model.build import build_model


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "ds", n_train=96, n_val=16, shard_size=16)


@pytest.fixture(scope="module")
def tiny():
    _, train_transform, _, tokenizer = build_model(ModelConfig())
    return train_transform, tokenizer
