"""Typed configuration: YAML files + ``key=value`` overrides, validated into dataclasses.

OmegaConf does the merging and type checking (structured configs); this module only turns its
errors into one clear message that names the offending key and where it came from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Type, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _merge(base, update, source: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{source}: bad config key '{key}': {msg}") from None


def load_config(schema: Type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``schema`` from its defaults, then ``path`` (YAML), then ``key=value`` overrides.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors carry line numbers in their text
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: cannot parse overrides {overrides}: {err}") from None
        cfg = _merge(cfg, dotlist, "command line")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad config key '{key}': {str(err).splitlines()[0]}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass config as plain nested dicts (for checkpoints and logs)."""
    return dataclasses.asdict(obj)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
