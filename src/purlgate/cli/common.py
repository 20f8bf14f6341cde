"""What every command shares: exit codes and the region options."""

# Imports inside the command functions are on purpose: each command imports what it
# needs when it runs, so that ``purlgate --help`` answers at once.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from purlgate.config import Config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def region_dir(args: argparse.Namespace) -> tuple[str, Path, Config]:
    from purlgate.config import load_config

    config = load_config(args.config)
    region_id = args.region or next(iter(config.regions))
    return region_id, args.data_dir or config.region(region_id).data_dir, config


def port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)
