"""The one bounds/choices checker of every config schema (trainer, ingestion, evaluation, experiments).

Two layers, both raising ``ConfigError`` with one line that names the dotted key and the value:

- ``check_finite(config)``: every float of every schema, found by walking the dataclasses (fields, Optional
  fields and lists of numbers; free-form dicts excepted), must be finite. ``load_config`` runs it on every
  schema before the schema's own ``validate()``, so no schema lists its fields for it. Why a walk: NaN
  compares False with everything, so ``value < low`` checks let it through (``optim.lr=nan`` did).
- ``check_bounds(config, BOUNDS)`` with a schema's table of ``Range`` and ``Choice`` declarations keyed by
  dotted field name: each field's rule is written once, beside the schema.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

from common.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """low ≤ value (or < with ``low_open``), value ≤ high (or < with ``high_open``); None = unbounded.
    ``none_ok``: None is allowed (an Optional field meaning "off" or "default")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = True

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "a number"

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


@dataclass(frozen=True)
class Choice:
    """The value is one of ``options``."""

    options: Tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + "|".join(map(str, self.options))

    def admits(self, value: Any) -> bool:
        return value in self.options


Rule = Union[Range, Choice]


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def within(low: float, high: float) -> Range:
    return Range(low=low, high=high)


def get_field(config: Any, key: str) -> Any:
    """The value at dotted ``key`` of a nested dataclass (``optim.lr`` → config.optim.lr)."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_rule(key: str, value: Any, rule: Rule) -> None:
    """ConfigError ``{key} must be {rule}, got {value}`` unless ``rule`` admits ``value``; a list is checked
    element by element (``study.lrs`` of positive numbers)."""
    values = value if isinstance(value, (list, tuple)) and isinstance(rule, Range) else [value]
    for item in values:
        if not rule.admits(item):
            raise ConfigError(f"{key} must be {rule.describe()}, got {value!r}")


def check_bounds(config: Any, bounds: Mapping[str, Rule], prefix: str = "") -> None:
    """Every declared rule of ``bounds`` on ``config``; keys are dotted field paths below ``config``."""
    for key, rule in bounds.items():
        check_rule(prefix + key, get_field(config, key), rule)


def numeric_fields(config: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every number of a dataclass tree: int/float fields (bools excepted), Optional
    ones when set, lists/tuples of numbers. Dict fields are free-form (fsspec options, model kwargs) and
    skipped."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from numeric_fields(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            yield key, value


def check_finite(config: Any) -> None:
    """ConfigError for the first NaN or ±inf number anywhere in the config (see the module docstring)."""
    for key, value in numeric_fields(config):
        values: Sequence = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
