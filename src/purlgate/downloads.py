"""Results too big for mail, kept for a while behind a single-purpose link.

A reply larger than the relay takes is not sent: its attachment (the AES ZIP with the
client's password, holding the PGP-encrypted files for a PGP project: exactly what the
reply would have carried) is moved to ``<root>/<token>.zip``, with ``<token>.json``
beside it (the batch, the client, the file's name and size, when it expires), and the
reply says where to download it. The token is 128 random bits (32 hex digits): it can
be neither guessed nor derived, and it opens that one file only. The web side serves
``/d/<token>`` until the expiry, then answers as for any unknown link; the sweep
removes what expired. Files are 0600 in a 0700 folder; the metadata holds no client
data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from purlgate.core.files import AtomicFile, fsync_dir

TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Download:
    token: str
    name: str  # the file name the client gets
    batch_id: int
    client: str
    size: int
    expires_at: float  # Unix time


class Downloads:
    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.clock = clock
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def keep(self, source: Path, *, name: str, batch_id: int, client: str,
             hours: float) -> Download:
        """Move ``source`` here under a new token, available for ``hours``."""
        token = secrets.token_hex(16)
        target = self.root / f"{token}.zip"
        try:
            source.replace(target)  # the same file system: no copy
        except OSError:
            shutil.copyfile(source, target)
            source.unlink(missing_ok=True)
        target.chmod(0o600)
        with target.open("rb") as f:
            os.fsync(f.fileno())
        found = Download(token, name, batch_id, client, target.stat().st_size,
                         self.clock() + hours * 3600)
        with AtomicFile(self.root / f"{token}.json", mode=0o600) as out:
            out.file.write(json.dumps(asdict(found)).encode())
            out.commit()  # the commit point: a token without its .json is not served
        return found

    def find(self, token: str) -> tuple[Download, Path] | None:
        """The download of ``token`` and its file, while it lasts; else None."""
        if not TOKEN.match(token):
            return None
        found = self._read(self.root / f"{token}.json")
        path = self.root / f"{token}.zip"
        if found is None or found.expires_at <= self.clock() or not path.is_file():
            return None
        return found, path

    def by_batch(self) -> dict[int, Download]:
        """The downloads that still last, by batch (the batch view: one look for all)."""
        now = self.clock()
        return {found.batch_id: found for meta in self.root.glob("*.json")
                if (found := self._read(meta)) is not None and found.expires_at > now}

    @staticmethod
    def _read(meta: Path) -> Download | None:
        try:
            return Download(**json.loads(meta.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def sweep(self) -> int:
        """Remove what expired (and a file whose metadata never committed, once old)."""
        now = self.clock()
        removed = 0
        for meta in self.root.glob("*.json"):
            found = self._read(meta)
            if found is not None and found.expires_at <= now:
                (self.root / f"{found.token}.zip").unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                removed += 1
        for orphan in self.root.glob("*.zip"):
            with contextlib.suppress(OSError):
                if not orphan.with_suffix(".json").exists() \
                        and now - orphan.stat().st_mtime > 3600:
                    orphan.unlink()
        if removed:
            fsync_dir(self.root)
        return removed
