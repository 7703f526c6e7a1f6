"""How the report writes values: one place, so that report.md, the text files and the advice print a number alike."""

from __future__ import annotations

import math
from typing import Any


def number(value: Any) -> str:
    """Numbers as in summary.json (ints with thousands separators, floats rounded to 4 decimals)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{round(value, 4):,}"
    return str(value)


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def x100(value: Any) -> float | None:
    """ROUGE is stored as a fraction and shown in points."""
    return None if value is None else 100 * float(value)


def shorten(text: Any, limit: int) -> str:
    """At most ``limit`` characters, cut at a word so that an excerpt never ends mid-word."""
    text = " ".join(str(text or "").split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def md_cell(text: str) -> str:
    """Text safe inside a markdown table cell or block quote."""
    return " ".join(str(text).split()).replace("|", "\\|")
