"""One way to say what is wrong with a pydantic-validated value (frames, reports, params)."""

from __future__ import annotations

from pydantic import ValidationError


def problems(exc: ValidationError, *, limit: int = 10, root: str = "body") -> list[str]:
    """`location: message` per error, at most `limit`; `root` names an error of the whole value."""
    return [f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}" for e in exc.errors()[:limit]]


def describe(exc: ValidationError, *, limit: int = 5, root: str = "body") -> str:
    """The same problems on one line."""
    return "; ".join(problems(exc, limit=limit, root=root))
