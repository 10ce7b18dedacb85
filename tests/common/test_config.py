"""YAML + key=value overrides validated into dataclasses; errors name the key."""
from pathlib import Path

import pytest

from common.config_loader import ConfigError, load_config
from pipeline.settings import IngestConfig
from common.paths import REPO_ROOT
import yaml

from common.validation import get_field

ROOT = REPO_ROOT


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


# ---- the whole kind "an override that is not one": each a ConfigError naming the override/key ----
MALFORMED = ["data.path=[1,2", "input.columns=[url", "x={a", "run.run_dir='abc", 'run.run_dir="abc', "a.b=}",
             "a.b=[1, {c: 2]"]


@pytest.mark.parametrize("schema_name", ["IngestConfig", "TrainConfig"])
@pytest.mark.parametrize("override", MALFORMED)
def test_unparsable_override_names_the_override(schema_name, override):
    from train.config import TrainConfig

    schema = {"IngestConfig": IngestConfig, "TrainConfig": TrainConfig}[schema_name]
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, ["reshard.seed=1" if schema is IngestConfig else "optim.lr=0.1", override])
    assert f"override '{override}'" in str(err.value) and "cannot parse" in str(err.value)
    assert "\n" not in str(err.value)


# (schema, override, key the message must name): a section set to a scalar / list / null, a nested key
# under a scalar or list field, an empty or spaced key, an empty part.
BAD_KEYS = [
    ("TrainConfig", "optim=3", "'optim'"), ("TrainConfig", "data=[1,2]", "'data'"),
    ("TrainConfig", "optim.lr.x=3", "'optim.lr'"), ("TrainConfig", "data.path.x=1", "'data.path'"),
    ("IngestConfig", "download=3", "'download'"), ("IngestConfig", "download=[1,2]", "'download'"),
    ("IngestConfig", "download.image_size.foo=3", "'download.image_size'"),
    ("IngestConfig", "input.columns.x=1", "'input.columns.x'"), ("IngestConfig", "input=", "'input'"),
    ("IngestConfig", "=3", "''"), ("TrainConfig", "=3", "''"), ("IngestConfig", " =3", "' '"),
    ("TrainConfig", "optim .lr=3", "'optim .lr'"), ("IngestConfig", "down load.image_size=3", "'down load"),
    ("IngestConfig", "download..image_size=3", "'download..image_size'"), ("TrainConfig", ".=3", "'.'"),
]


@pytest.mark.parametrize("schema_name,override,key", BAD_KEYS)
def test_bad_key_kinds_are_named_never_a_question_mark(schema_name, override, key):
    from train.config import TrainConfig

    schema = {"IngestConfig": IngestConfig, "TrainConfig": TrainConfig}[schema_name]
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, [override])
    assert key in str(err.value) and "'?'" not in str(err.value), str(err.value)


@pytest.mark.parametrize("text,key", [("download: 3\n", "'download'"), ("input:\n  columns:\n    x: 1\n",
                                                                           "'input.columns.x'")])
def test_section_set_to_a_scalar_in_yaml_names_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, path)
    assert key in str(err.value) and "'?'" not in str(err.value)


def test_good_overrides_still_apply_in_order():
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["optim.lr=0.5", "optim.lr=0.25",
                                          "data.storage_options.client_kwargs.endpoint_url=http://h:1"])
    assert cfg.optim.lr == 0.25 and cfg.data.storage_options == {"client_kwargs": {"endpoint_url": "http://h:1"}}


# ---- a damaged manifest.json: one ValueError (ManifestError) naming the file and the fault ----
GOOD_SHARD = {"path": "train/000000.tar", "num_samples": 3}
BAD_MANIFESTS = {
    "list": ("[]", "expected a JSON object, got list"),
    "number": ("3", "got int"),
    "string": ('"manifest"', "got str"),
    "null": ("null", "got NoneType"),
    "invalid json": ("{not json", "not valid JSON"),
    "truncated": ('{"version": 1, "splits": {"train": {"shards": [', "not valid JSON"),
    "empty file": ("", "not valid JSON"),
    "no version": ('{"splits": {}}', "unsupported manifest version None"),
    "no splits": ('{"version": 1}', "'splits' must be an object"),
    "splits a list": ('{"version": 1, "splits": []}', "'splits' must be an object"),
    "split a string": ('{"version": 1, "splits": {"train": "x"}}', "split 'train'"),
    "shards not a list": ('{"version": 1, "splits": {"train": {"shards": {}}}}', "split 'train'"),
    "shard missing path": ('{"version": 1, "splits": {"train": {"shards": [{"num_samples": 3}]}}}', "shard 0"),
    "shard count a string": ('{"version": 1, "splits": {"train": {"shards": [{"path": "a.tar", "num_samples": "3"}]}}}',
                             "num_samples"),
    "negative count": ('{"version": 1, "splits": {"train": {"shards": [{"path": "a.tar", "num_samples": -1}]}}}',
                       "num_samples"),
    "shard a number": ('{"version": 1, "splits": {"train": {"shards": [7]}}}', "shard 0"),
    "unknown shard key": ('{"version": 1, "splits": {"train": {"shards": [{"path": "a.tar", "num_samples": 1, '
                          '"bogus": 1}]}}}', "bogus"),
    "fields a list": ('{"version": 1, "splits": {}, "fields": ["jpg"]}', "'fields'"),
    "seed a string": ('{"version": 1, "splits": {}, "seed": "x"}', "'seed'"),
    "wids index a number": ('{"version": 1, "splits": {"train": {"shards": [], "wids_index": 3}}}', "wids_index"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_damaged_manifest_is_one_value_error_naming_file_and_fault(tmp_path, case):
    from common.shard_folder import ManifestError, read_manifest

    text, expected = BAD_MANIFESTS[case]
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    assert isinstance(err.value, ValueError)
    assert str(tmp_path / "manifest.json") in str(err.value) and expected in str(err.value), str(err.value)


def test_valid_manifest_still_reads(tmp_path):
    import json

    from common.shard_folder import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"version": 1, "seed": 4, "fields": {"image": "png"},
         "splits": {"train": {"shards": [GOOD_SHARD, {**GOOD_SHARD, "path": "train/000001.tar", "sha256": "ab"}],
                              "wids_index": "train.wids.json", "num_samples": 6}}}))
    m = read_manifest(tmp_path)
    assert m.splits["train"].num_samples == 6 and m.fields["image"] == "png" and m.seed == 4
    assert m.shard_paths("train")[1] == str(tmp_path / "train" / "000001.tar")


# ---- numbers no one can mean (image_size=0 made every row other_error): refused, naming the key ----
@pytest.mark.parametrize("override", [
    "num_workers=0", "input.csv_block_bytes=0", "captions.min_chars=-1", "captions.max_chars=0",
    "download.image_size=0", "download.image_size=-3", "download.processes_count=0", "download.thread_count=0",
    "download.timeout=0", "download.timeout=-5", "download.retries=-1", "download.retry_after_cap=-1",
    "download.retry_after_cap=inf", "download.retry_backoff_s=-0.5", "download.retry_backoff_s=nan",
    "download.number_sample_per_shard=0", "download.max_decode_pixels=0", "images.min_side=-1",
    "images.max_aspect_ratio=0.5", "images.max_aspect_ratio=nan", "images.max_aspect_ratio=inf", "reshard.samples_per_shard=0",
    "reshard.seed=-1", "reshard.val_fraction=-0.1", "dedup.partitions=0",
])
def test_impossible_numbers_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(IngestConfig, None, [override])


@pytest.mark.parametrize("overrides,message", [
    (["captions.min_chars=10", "captions.max_chars=5"], "captions.max_chars must be >= 10"),
    (["reshard.val_split=train"], "must differ"), (["reshard.train_split=a/b"], "reshard.train_split"),
])
def test_inconsistent_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IngestConfig, None, overrides)


@pytest.mark.parametrize("override", ["download.image_size=1", "download.retries=0", "images.min_side=0",
                                      "images.max_aspect_ratio=1", "reshard.seed=0", "captions.min_chars=0",
                                      "images.max_aspect_ratio=null", "download.retry_backoff_s=0"])
def test_edge_values_that_can_be_meant_are_accepted(override):
    # The value that arrives is the one typed: yaml.safe_load of the text is the independent reference.
    key, text = override.split("=", 1)
    cfg = load_config(IngestConfig, None, [override])
    assert get_field(cfg, key) == yaml.safe_load(text)


def test_an_empty_value_is_the_empty_string_for_a_str_field_and_none_for_an_optional_one(tmp_path):
    """`logging.wandb.project=` (wandb off) or `project:` with nothing after it: a str field gets "", not a type
    error about None; an Optional field (model.pretrained) stays None."""
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["logging.wandb.project=", "model.pretrained=", "logging.wandb.name=x"])
    assert (cfg.logging.wandb.project, cfg.model.pretrained, cfg.logging.wandb.name) == ("", None, "x")
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  wandb:\n    project:\n    entity: team\nmodel:\n  pretrained:\n")
    cfg = load_config(TrainConfig, str(path), [])
    assert (cfg.logging.wandb.project, cfg.logging.wandb.entity, cfg.model.pretrained) == ("", "team", None)
    with pytest.raises(ConfigError, match="optim.steps"):    # a number still needs a number
        load_config(TrainConfig, None, ["optim.steps="])
