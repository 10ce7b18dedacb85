"""YAML + key=value overrides validated into dataclasses; errors name the key."""
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.settings import IngestConfig


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
