"""Caption cleaning and caption rules. Pure functions: bytes/str in, (caption, reason) out."""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

from pipeline.settings import CaptionRules

# C0/C1 control characters other than ordinary whitespace; tabs and newlines become spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
_WORDCHAR = re.compile(r"[^\W_]")  # a letter or digit in any script


def decode_caption(raw) -> Tuple[Optional[str], Optional[str]]:
    """bytes/str/None -> (text, reason). Invalid UTF-8 (or lone surrogates, which is how
    surrogateescape-decoded JSON carries it) is a counted reason, never a crash. None, NaN,
    +-Infinity and booleans (a float/bool parquet column) are no text: (None, None)."""
    if raw is None or isinstance(raw, bool) or (isinstance(raw, float) and not math.isfinite(raw)):
        return None, None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            return bytes(raw).decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "caption_invalid_utf8"
    text = str(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "caption_invalid_utf8"
    return text, None


def clean_caption(text: str) -> Tuple[str, bool]:
    """Strip control characters and normalise whitespace. Returns (clean, had_control_chars)."""
    stripped = _CONTROL.sub(" ", text)
    return _WHITESPACE.sub(" ", stripped).strip(), stripped != text


def caption_reason(caption: Optional[str], rules: CaptionRules) -> Optional[str]:
    """The first caption rule a cleaned caption breaks, or None if it passes."""
    if caption is None or caption == "":
        return "caption_empty"
    if len(caption) < rules.min_chars:
        return "caption_too_short"
    if len(caption) > rules.max_chars:
        return "caption_too_long"
    if rules.reject_only_urls and _URL.search(caption) and not _URL.sub("", caption).strip():
        return "caption_only_urls"
    if rules.reject_only_symbols and not _WORDCHAR.search(caption):
        return "caption_only_symbols"
    return None
