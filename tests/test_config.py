"""YAML + key=value overrides validated into dataclasses; errors name the key."""
from pathlib import Path

import pytest

from common.config_loader import ConfigError, load_config
from pipeline.settings import IngestConfig

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("download:\n  image_size: 64\nreshard:\n  seed: 3\n")
    cfg = load_config(IngestConfig, path, ["reshard.seed=7", "input.keep_columns=[a,b]"])
    assert cfg.download.image_size == 64 and cfg.reshard.seed == 7 and cfg.input.keep_columns == ["a", "b"]
    assert isinstance(cfg, IngestConfig)


@pytest.mark.parametrize("override,message", [
    ("download.imagesize=3", "download.imagesize"),
    ("download.image_size=big", "download.image_size"),
    ("reshard.val_fraction=2", "val_fraction"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IngestConfig, None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dedup:\n  partitons: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*dedup\.partitons"):
        load_config(IngestConfig, path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(IngestConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("fmt,quality", [("jpg", 95), ("webp", 95), ("png", 1)])
def test_encode_quality_defaults_to_the_formats_own(fmt, quality):
    assert load_config(IngestConfig, None, [f"download.encode_format={fmt}"]).download.quality == quality
    assert load_config(IngestConfig, None, [f"download.encode_format={fmt}", "download.encode_quality=7"]
                       ).download.quality == 7


@pytest.mark.parametrize("override", ["download.encode_quality=95", "download.encode_quality=-1"])
def test_png_compression_level_out_of_range_names_the_key(override):
    with pytest.raises(ConfigError, match="download.encode_quality"):
        load_config(IngestConfig, None, ["download.encode_format=png", override])


def test_model_config_file_decides_the_model_even_when_the_yaml_names_one(tmp_path):
    from train.config import TrainConfig

    wide = tmp_path / "wide_vit.json"
    wide.write_text((ROOT / "configs" / "model" / "tiny_vit.json").read_text())
    cfg = load_config(TrainConfig, ROOT / "configs" / "pretrain_cyclip.yaml", [f"model.config_file={wide}"])
    assert cfg.model.name == "wide_vit"  # the YAML says tiny_vit; open_clip registers the file as wide_vit
    with pytest.raises(ConfigError, match=r"model\.config_file: no such file"):
        load_config(TrainConfig, ROOT / "configs" / "pretrain_cyclip.yaml", [f"model.config_file={tmp_path}/nope.json"])
