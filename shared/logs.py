"""Logging setup for every process: one line per record, the process name first.

Text a node sends (its browser and OS, a task's failure message, ...) is the attacker's
choice: `safe_text` shows it literally on one line, with control characters (terminal escape
sequences, newlines that would forge a log line, bidirectional overrides) written as
escapes. Services pass node text through it where they log it, and every record's message is
escaped the same way as it is written (`EscapeControl`), so a call site that forgets cannot
reach the operator's terminal with an escape sequence.
"""

from __future__ import annotations

import logging
import re
import sys

_TOKEN = re.compile(r"(token=)[^\s&\"']+")

NODE_TEXT_LIMIT = 200  # characters of one piece of node text in a log line


def _escapes() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
    table |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
    # line separators and the bidirectional controls that reorder what a terminal shows
    for c in (0x2028, 0x2029, *range(0x200E, 0x2010), *range(0x202A, 0x202F), *range(0x2066, 0x206A)):
        table[c] = f"\\u{c:04x}"
    return table


_ESCAPES = _escapes()
_NEEDS_ESCAPE = re.compile("[" + "".join(re.escape(chr(c)) for c in _ESCAPES) + "]")


def escape_control(text: str) -> str:
    """`text` with every control character written as a visible escape (`\\x1b`, `\\n`)."""
    return text.translate(_ESCAPES) if _NEEDS_ESCAPE.search(text) else text


def safe_text(value: object, limit: int = NODE_TEXT_LIMIT) -> str:
    """Node-supplied `value` as one literal line for a log or a terminal: control characters
    escaped, at most `limit` characters of it (then `…`)."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit] + "…" if len(text) > limit else text
    return escape_control(cut)


class RedactTokens(logging.Filter):
    """Session tokens travel in WebSocket URLs; servers log URLs. Keep tokens out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg = _TOKEN.sub(r"\1<redacted>", message)
            record.args = None
        return True


class EscapeControl(logging.Filter):
    """One line per record, with no escape sequence in it: control characters in a record's
    message (which may quote node text) are written as escapes. Tracebacks are separate."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _NEEDS_ESCAPE.search(message):
            record.msg = escape_control(message)
            record.args = None
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactTokens())
    handler.addFilter(EscapeControl())
    handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log is noisy at INFO: one line per static file
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
