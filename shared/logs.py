"""Logging setup for every process: one line per record, the process name first."""

from __future__ import annotations

import logging
import re
import sys

_TOKEN = re.compile(r"(token=)[^\s&\"']+")


class RedactTokens(logging.Filter):
    """Session tokens travel in WebSocket URLs; servers log URLs. Keep tokens out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg = _TOKEN.sub(r"\1<redacted>", message)
            record.args = None
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactTokens())
    handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log is noisy at INFO: one line per static file
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
