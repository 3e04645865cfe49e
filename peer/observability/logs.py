"""How a peer process logs: plain text or one JSON object per line, and litellm kept quiet.

Invariants:
- `configure_logging` installs exactly one handler, on the root logger; every record of the
  process goes through it, in the chosen format, to the given stream (stderr for the agent).
- The JSON format writes one object per line with `time` (UTC, ISO 8601 with milliseconds),
  `level`, `logger` and `message`, then every field the call passed in `extra` (the task
  lifecycle's `event`, `task_id`, `role`, `epoch`, `peer`, ...), then `exception` when the
  record carries one. Values that JSON cannot hold are written as their `str`.
- litellm logs through its own loggers (`LITELLM_LOGGERS`) with handlers of its own. Below
  DEBUG they are held at WARNING, and once litellm is imported (`adopt_litellm_loggers`) its
  handlers are removed, so what it still says reaches our one handler, in our format, once.

Written by hand rather than with a JSON logging package: the formatter is a few lines over the
standard `logging.Formatter`, and the project keeps its dependency list short.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
"""The loggers litellm creates (litellm/_logging.py), each with a handler of its own."""

_STANDARD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
"""Attributes every `LogRecord` has: anything else on a record came from `extra`."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (see the module invariants)."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        created = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z"
        line: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str, stream: TextIO) -> None:
    """Send every record at `level` or above to `stream` in `log_format` ("text" or "json").

    Raises:
        ValueError: `log_format` is not one of `LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Every model call made two multi-line INFO records of litellm's: operators see them only
    # when they ask for debug logs.
    quiet = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def adopt_litellm_loggers() -> None:
    """Remove the handlers litellm attached to its loggers at import, so its records reach the
    root handler only: one copy, in the peer's format. Call it right after importing litellm."""
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
