"""Log set-up shared by the commands and the worker processes of ``serve``."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

# Libraries that log every command or request at INFO: theirs only at DEBUG.
CHATTY = ("mail.log", "asyncssh", "aiohttp.access", "aiohttp.server", "imap_tools")
# What the last ``setup_logging`` chose, for worker processes to do the same.
current: tuple[str, str] = ("WARNING", "text")


INSTANCE = os.environ.get("PURLGATE_INSTANCE") or socket.gethostname()


def set_instance(name: str) -> None:
    """Name this instance (``serve --instance``): in every log line, lease and batch,
    and in the worker processes it starts (they read the environment)."""
    global INSTANCE  # noqa: PLW0603 - one process-wide name
    INSTANCE = name
    os.environ["PURLGATE_INSTANCE"] = name


def instance_name() -> str:
    return INSTANCE


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, instance, message, and the facts
    a line carries as keys (``extra={"facts": {...}}``: event, batch, client, project,
    channel, state, rows, errors, seconds), so that ops can query them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(), "logger": record.name,
            "instance": INSTANCE, "message": record.getMessage()}
        facts = getattr(record, "facts", None)
        if isinstance(facts, dict):
            entry.update({k: v for k, v in facts.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def announce(message: str, **facts: object) -> None:
    """A line for people reading the terminal (the start-up banner, on stdout): as it is,
    or with ``--log-format json`` a JSON object like every log line, so a log shipper
    reading a container's merged output never meets plain text."""
    if current[1] == "json":
        print(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": "info",
                          "logger": "purlgate", "instance": INSTANCE, "message": message,
                          **facts}, ensure_ascii=False), flush=True)
    else:
        print(message, flush=True)


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
