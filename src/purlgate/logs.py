"""Log set-up shared by the commands and the worker processes of ``serve``."""

from __future__ import annotations

import json
import logging
import sys

# Libraries that log every command or request at INFO: theirs only at DEBUG.
CHATTY = ("mail.log", "asyncssh", "aiohttp.access", "aiohttp.server", "imap_tools")
# What the last ``setup_logging`` chose, for worker processes to do the same.
current: tuple[str, str] = ("WARNING", "text")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    global current  # noqa: PLW0603 - one process-wide setting, like logging's own
    current = (level, fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
