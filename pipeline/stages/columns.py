"""Curation rules on input columns (``input.column_filters``), applied in the input stage, before any
download, so a rejected row costs no request.

A rule is ``COLUMN OP VALUE`` with OP one of ``>= > <= < == !=`` (spaces around OP optional):

    similarity >= 0.28      punsafe < 0.5      pwatermark < 0.8      LANGUAGE == en      NSFW != NSFW

- ``>= > <= <`` compare numbers; VALUE must be a finite number. A text cell that reads as a number
  (a CSV column with one stray word is read as text) is compared as that number.
- ``== !=`` compare numbers when VALUE is a number and the cell is one (``WIDTH == 512``), else text,
  exactly (case-sensitive). A quoted VALUE (``LANGUAGE == "1"``) is always text, quotes removed.
- A missing value fails every rule, ``!=`` included: null, NaN, an absent JSON key, empty text, and for
  ``>= > <= <`` a cell that is not a number.

A row is counted under the first rule it fails, as ``column:<rule>`` (the rule in its canonical form
``COLUMN OP VALUE``, single spaces), so each input row is counted once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import ConfigError, InputError

ORDERING = {">=", "<=", ">", "<"}
REASON_PREFIX = "column:"
_OP_CHARS = "<>=!"
# COLUMN: no operator characters, no surrounding spaces; VALUE must not start with an operator character.
_RULE = re.compile(r"^\s*(?P<col>[^<>=!\s](?:[^<>=!]*[^<>=!\s])?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<val>.*?)\s*$")
_NUMPY_OPS = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less,
              "==": np.equal, "!=": np.not_equal}


@dataclass(frozen=True)
class ColumnRule:
    column: str
    op: str
    text: str
    """The value as compared when the comparison is on text (quotes removed)."""
    number: Optional[float]
    """The value as a number; None when it is not one (or was quoted)."""
    source: str
    """The canonical form ``COLUMN OP VALUE`` (the value as written): the rule's name in summary.json."""

    @property
    def reason(self) -> str:
        return REASON_PREFIX + self.source


def _as_number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_rule(rule: str, key: str = "input.column_filters") -> ColumnRule:
    """One rule -> ColumnRule; ConfigError (one line naming ``key`` and the rule) when malformed."""
    if not isinstance(rule, str):
        raise ConfigError(f"{key}: rule {rule!r} is not text; write COLUMN OP VALUE, e.g. 'similarity >= 0.28'")
    m = _RULE.match(rule)
    written = m.group("val") if m else ""
    if m is None or not written or written[0] in _OP_CHARS:
        raise ConfigError(f"{key}: malformed rule '{rule}'; write COLUMN OP VALUE with OP one of "
                          ">= > <= < == !=, e.g. 'similarity >= 0.28' or 'LANGUAGE == en'")
    col, op = m.group("col"), m.group("op")
    quoted = len(written) >= 2 and written[0] == written[-1] and written[0] in "'\""
    text = written[1:-1] if quoted else written
    number = None if quoted else _as_number(text)
    if op in ORDERING and number is None:
        raise ConfigError(f"{key}: rule '{rule}': {op} needs a finite number after it, got {written!r}")
    if not text.strip():
        raise ConfigError(f"{key}: rule '{rule}' compares with empty text, which is a missing value and "
                          "fails every rule")
    return ColumnRule(column=col, op=op, text=text, number=number, source=f"{col} {op} {written}")


def parse_rules(rules: Sequence[str], key: str = "input.column_filters") -> List[ColumnRule]:
    """Every rule parsed; ConfigError for a malformed one or a rule given twice."""
    parsed = [parse_rule(r, key) for r in rules]
    seen = set()
    for r in parsed:
        if r.source in seen:
            raise ConfigError(f"{key}: rule '{r.source}' is given twice")
        seen.add(r.source)
    return parsed


def rule_columns(rules: Sequence[ColumnRule]) -> List[str]:
    """The columns the rules read, each once, in rule order."""
    return list(dict.fromkeys(r.column for r in rules))


def require_rule_columns(path, found: Sequence[str], rules: Sequence[ColumnRule]) -> None:
    """InputError (one line) naming the first rule whose column the input does not have, and the columns it has."""
    for r in rules:
        if r.column not in found:
            raise InputError(f"{path}: input.column_filters rule '{r.source}' names column '{r.column}', which "
                             f"this input does not have; its columns are {list(found)}")


# ---- evaluation -------------------------------------------------------------------------------------

def _cell_number(value) -> Optional[float]:
    """A cell as a number (NaN kept, so it fails), or None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _cell_text(value) -> Optional[str]:
    """A cell as text; None when missing (null, NaN, empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _cell_passes(value, rule: ColumnRule) -> bool:
    """The reference rule for one cell (the vectorised paths below agree with it)."""
    if rule.op in ORDERING or rule.number is not None:
        number = _cell_number(value)
        if number is not None:
            return not math.isnan(number) and bool(_NUMPY_OPS[rule.op](number, rule.number))
        if rule.op in ORDERING:
            return False
    text = _cell_text(value)
    if text is None:
        return False
    return (text == rule.text) == (rule.op == "==")


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def passes(column: pa.ChunkedArray, rule: ColumnRule, path=None) -> np.ndarray:
    """Boolean mask: which cells of ``column`` pass ``rule``."""
    t = column.type
    if _is_numeric(t):
        if rule.number is None:
            where = f"{path}: " if path else ""
            raise InputError(f"{where}input.column_filters rule '{rule.source}' compares column '{rule.column}' "
                             f"(numbers, {t}) with the text {rule.text!r}; use a number")
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return _NUMPY_OPS[rule.op](values, rule.number) & ~np.isnan(values)
    is_text = pa.types.is_string(t) or pa.types.is_large_string(t)
    if is_text and rule.number is not None:  # numbers written as text (CSV): one cast if every cell reads
        try:
            numbers = pc.cast(pc.utf8_trim_whitespace(column), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            numbers = None  # some cell is not a number: cell by cell below
        if numbers is not None:
            return passes(numbers, rule, path)
    if is_text and rule.number is None:
        stripped = pc.utf8_trim_whitespace(column)
        present = pc.greater(pc.utf8_length(stripped), 0).fill_null(False)
        same = pc.equal(column, rule.text).fill_null(False)
        ok = same if rule.op == "==" else pc.and_(pc.invert(same), present)
        return np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    return np.fromiter((_cell_passes(v, rule) for v in column.to_pylist()), dtype=bool, count=len(column))


def first_failures(table: pa.Table, rules: Sequence[ColumnRule], path=None) -> List[Optional[str]]:
    """Per row, the reason of the first rule it fails (``column:<rule>``), or None when it passes all."""
    reasons: List[Optional[str]] = [None] * table.num_rows
    if not rules or table.num_rows == 0:
        return reasons
    undecided = np.ones(table.num_rows, dtype=bool)
    for rule in rules:
        failing = undecided & ~passes(table.column(rule.column), rule, path)
        for i in np.flatnonzero(failing):
            reasons[i] = rule.reason
        undecided &= ~failing
    return reasons
