"""Typed configuration: YAML files + ``key=value`` overrides, validated into dataclasses.

OmegaConf does the merging and type checking (structured configs); this module only turns its
errors into one clear message that names the offending key and where it came from, and keeps
YAML 1.1 from rewriting what the user typed into a string field: ``resize_mode: no`` (or ``off``,
``yes``, ``1.10``) would reach the schema as False / 1.1 and be stringified to "False" / "1.1".
Every str field (also inside List[str] / Dict[str, str] / Optional[str]) of every schema gets the
scalar exactly as written instead.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
import typing
from typing import Any, Dict, Iterable, Tuple, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError  # noqa: F401  (re-exported: `from common.config_loader import ConfigError`)
from common.validation import check_finite

T = TypeVar("T")




def _merge(base, update, source: str, fallback_key: str = "?"):
    """OmegaConf.merge with its errors as one ConfigError naming the key. OmegaConf names no key
    when a section is set to a scalar or a list; then the top-level key of ``update`` that fails
    alone is named (or ``fallback_key``)."""
    try:
        return OmegaConf.merge(base, update)
    except (OmegaConfBaseException, ValueError, TypeError) as err:  # TypeError: a list field given a mapping
        key = getattr(err, "full_key", None) or _failing_key(base, update) or fallback_key
        msg = str(err).splitlines()[0]
        if msg.startswith("Merge error:"):
            msg = f"'{key}' is a config section: set its fields ({key}.<field>=...), not the section ({msg})"
        elif "incompatible container" in msg:
            msg = f"a mapping given where the schema has a list, or the reverse ({msg})"
        raise ConfigError(f"{source}: bad config key '{key}': {msg}") from None


def _failing_key(base, update, prefix: Tuple = ()) -> str | None:
    """The deepest dotted key of ``update`` whose merge into ``base`` fails alone."""
    if not OmegaConf.is_dict(update):
        return None
    for key in update:
        def nested(value, path=prefix + (key,)):
            for part in reversed(path):
                value = {part: value}
            return value
        try:
            OmegaConf.merge(base, nested(update[key]))
        except Exception:
            return _failing_key(base, update[key], prefix + (key,)) or ".".join(map(str, prefix + (key,)))
    return None


def _scalar_texts(node, prefix: Tuple = ()) -> Dict[Tuple, str]:
    """{key path: the text as written} for every non-string YAML scalar under ``node``."""
    out: Dict[Tuple, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out.update(_scalar_texts(value_node, prefix + (str(key_node.value),)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_scalar_texts(item, prefix + (i,)))
    elif isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:str":
        out[prefix] = node.value
    return out


def _restore_strings(tp, value, texts: Dict[Tuple, str], path: Tuple, source: str):
    """``value`` (plain containers) with every bool/int/float that sits in a str field of schema
    type ``tp`` replaced by its text as written (from ``texts``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]: an empty value stays None
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _restore_strings(non_none[0], value, texts, path, source) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return {k: _restore_strings(hints[k], v, texts, path + (k,), source) if k in hints else v
                for k, v in value.items()}
    if origin in (list, tuple, typing.List, typing.Tuple) and isinstance(value, list) and args:
        return [_restore_strings(args[0], v, texts, path + (i,), source) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict) and isinstance(value, dict) and len(args) == 2:
        return {k: _restore_strings(args[1], v, texts, path + (k,), source) for k, v in value.items()}
    if tp is str and value is None:    # `key=` or `key:` with nothing after it: the empty string
        return ""
    if tp is str and isinstance(value, (bool, int, float)):
        text = texts.get(path)
        if text is None:
            key = ".".join(str(p) for p in path)
            raise ConfigError(f"{source}: key '{key}' is a string field but got {value!r}; quote it")
        return text
    return value


def _as_written(schema, conf, texts: Dict[Tuple, str], source: str):
    container = OmegaConf.to_container(conf, resolve=False)
    return OmegaConf.create(_restore_strings(schema, container, texts, (), source))


def _override_texts(overrides) -> Dict[Tuple, str]:
    texts: Dict[Tuple, str] = {}
    for item in overrides:
        key, raw = item.split("=", 1)
        try:
            node = yaml.compose(raw, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            continue  # OmegaConf reports the parse error itself
        texts.update(_scalar_texts(node, tuple(key.lstrip("+~").split("."))))
    return texts


def _parse_override(item: str):
    """One ``key=value`` override as a DictConfig; ConfigError naming the override if it is not one."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    parts = key.split(".")
    if not key.strip() or any(not p or p != p.strip() or any(c.isspace() for c in p) for p in parts):
        raise ConfigError(f"override '{item}': bad key '{key}' (dotted names without spaces or empty "
                          "parts, e.g. optim.lr=0.001)")
    try:
        return OmegaConf.from_dotlist([item])
    except Exception as err:  # yaml's ParserError/ScannerError and OmegaConf's own: the value does not parse
        problem = " ".join(str(err).split("\n")[0].split())
        raise ConfigError(f"override '{item}': cannot parse the value of '{key}' ({problem}); "
                          "quote it if it is meant as a string, or close its brackets/quotes") from None


def _apply_override(schema, cfg, item: str):
    one = _parse_override(item)
    key = item.split("=", 1)[0]
    try:
        update = _as_written(schema, one, _override_texts([item]), "command line")
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
    return _merge(cfg, update, f"command line (override '{item}')", fallback_key=key)


def _dotted_keys(tree, prefix: str = "") -> list:
    """Every dotted key of a nested mapping (sections and their fields)."""
    out = []
    for key, value in tree.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out.extend(_dotted_keys(value, f"{prefix}{key}."))
    return out


def refuse_renamed(schema, keys: Iterable[str], source: str) -> None:
    """ConfigError naming the new key when a key renamed in ``schema.RENAMED`` ({old dotted key: new}) is
    used: an old name is never a silent alias (it would be ignored by one reader and read by another)."""
    renamed = getattr(schema, "RENAMED", {})
    for key in keys:
        if key in renamed:
            raise ConfigError(f"{source}: {key} was renamed to {renamed[key]}; use {renamed[key]}")


def load_config(schema: Type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``schema`` from its defaults, then ``path`` (YAML), then ``key=value`` overrides.

    Unknown keys, renamed keys, values of the wrong type, NaN/±inf numbers (``common.validation``) and
    whatever the schema's ``validate()`` refuses raise :class:`ConfigError` naming the key.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the YAML
            loaded = OmegaConf.create(text)
            texts = _scalar_texts(yaml.compose(text, Loader=yaml.SafeLoader))
        except Exception as err:  # yaml errors carry line numbers in their text
            raise ConfigError(f"{path}: not valid YAML: {str(err).replace(chr(10), ' ')}") from None
        if loaded is not None and not OmegaConf.is_dict(loaded):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        if loaded:
            refuse_renamed(schema, _dotted_keys(OmegaConf.to_container(loaded, resolve=False)), str(path))
            cfg = _merge(cfg, _as_written(schema, loaded, texts, str(path)), str(path))
    overrides = list(overrides)
    refuse_renamed(schema, [o.split("=", 1)[0].lstrip("+~") for o in overrides if isinstance(o, str)], "command line")
    for item in overrides:
        cfg = _apply_override(schema, cfg, item)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad config key '{key}': {str(err).splitlines()[0]}") from None
    except (ValueError, TypeError) as err:  # a section's __post_init__ normalisation (it names its key)
        raise ConfigError(" ".join(str(err).split())) from None
    check_finite(obj)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass config as plain nested dicts (for checkpoints and logs)."""
    return dataclasses.asdict(obj)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def flat_fields(tree: dict) -> dict:
    """A config as plain dicts (``to_dict``) -> {"section.field": value}; top-level fields keep their name.

    Only sections are flattened: a field whose value is a dict (``data.storage_options``) stays one entry,
    so "which settings differ" names fields, not the insides of their values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{field}": inner for field, inner in value.items()})
        else:
            out[key] = value
    return out
