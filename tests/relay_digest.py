"""A relay for streaming tests, run as its own process (``python -m aiosmtpd -c
tests.relay_digest.Digest <file>``): it keeps only each message's SHA-256 and size, one
line per message in <file>, so that the sending process's memory is its own."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any


class Digest:
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    @classmethod
    def from_cli(cls, parser: argparse.ArgumentParser, *args: str) -> Digest:
        if len(args) != 1:
            parser.error("Digest takes the file its lines go to")
        return cls(args[0])

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = bytes(envelope.original_content or b"")
        with self.out.open("a") as f:
            f.write(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")
        return "250 2.0.0 kept its digest"
