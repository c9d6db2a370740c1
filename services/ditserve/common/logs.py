"""Structured logs: one line per event, `key=value` pairs, request ids where known.

    configure_logging("stage-1", level="INFO")
    log_event("microbatch_failed", microbatch_id=7, code="INVALID_ARGUMENT", message="...")
    # ts=2024-05-01T12:00:00.123Z level=INFO service=stage-1 event=microbatch_failed ...
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("ditserve")


def _quote(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if not text or any(ch in text for ch in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _KeyValueFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {"ts": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
                  "service": self.service, "event": record.getMessage(),
                  **getattr(record, "fields", {})}
        return " ".join(f"{key}={_quote(value)}" for key, value in fields.items())


def configure_logging(service: str, level: str = "INFO") -> None:
    """Sends ditserve's events to stderr as key=value lines tagged with `service`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(service))
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event with its fields (request_ids=..., microbatch_id=..., ...)."""
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, extra={"fields": fields})
