"""One way to say what is wrong with a pydantic-validated value (frames, reports, params),
and `strict_loads`, the JSON parser for what a node sends."""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .lazy import lazy

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")


def problems(exc: ValidationError, *, limit: int = 10, root: str = "body") -> list[str]:
    """`location: message` per error, at most `limit`; `root` names an error of the whole value."""
    return [f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}" for e in exc.errors()[:limit]]


def describe(exc: ValidationError, *, limit: int = 5, root: str = "body") -> str:
    """The same problems on one line."""
    return "; ".join(problems(exc, limit=limit, root=root))


# ---------------------------------------------------------------- JSON from a node

MAX_JSON_DEPTH = 32  # arrays and objects nested in one frame, at most
MAX_INT_DIGITS = 20  # an integer literal's digits, at most (a 64-bit value has 20)

# a JSON string, escapes included; one left open runs to the end of the text. Every `"`
# starts a match that cannot fail (so none is tried again from a later quote: linear time)
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class UnsafeJSON(ValueError):
    """JSON that Python's parser would take but a node may not send (see `strict_loads`)."""


def nesting_over(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Do the arrays and objects of JSON `text` nest deeper than `limit`? A cheap scan of
    the raw text (vectorised: milliseconds for megabytes), so a deeply nested frame is
    refused before a parser recurses into it. Brackets inside strings do not count."""
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text)).encode("ascii")
    if not brackets:
        return False
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = (codes == ord("[")).astype(np.int32) + (codes == ord("{")) - (codes == ord("]")) - (codes == ord("}"))
    return int(np.cumsum(steps).max()) > limit


def _refuse_constant(name: str) -> float:
    raise UnsafeJSON(f"expected finite numbers, got {name}")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 overflows to infinity
        raise UnsafeJSON(f"expected finite numbers, got {literal[:40]} (out of range)")
    return value


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise UnsafeJSON(f"expected integers of at most {MAX_INT_DIGITS} digits, got {len(literal)}")
    return int(literal)


def strict_loads(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from an untrusted peer. Unlike `json.loads` it refuses `Infinity`,
    `-Infinity`, `NaN`, numbers that overflow to infinity (`1e999`), integers of more than
    `MAX_INT_DIGITS` digits, and nesting deeper than `max_depth` (checked before parsing, so
    the parser never recurses that far). Raises `ValueError` (`UnsafeJSON` for these) with
    a message fit to send back."""
    if nesting_over(text, max_depth):
        raise UnsafeJSON(f"expected JSON nested at most {max_depth} deep, got deeper")
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
