"""The durable spool: a received message is on disk (fsynced) before we say yes.

``accept`` writes the raw message and its envelope to a temporary name, fsyncs both,
renames the message into ``incoming/`` (the commit point) and fsyncs the folder. Only
then may SMTP answer 250 or IMAP move the message. ``pending`` lists what a restart
must still process; ``finish`` removes an entry once its reply is queued.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purlgate.core.files import fsync_dir
from purlgate.errors import ServerError


class SpoolFullError(ServerError):
    code = "spool-full"
    smtp_code = 452
    smtp_status = "4.3.1"


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    path: Path  # the raw message
    meta: dict[str, Any]  # channel, mail_from, rcpt_tos, received_at

    @property
    def raw(self) -> bytes:
        return self.path.read_bytes()


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Spool:
    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.tmp = root / "tmp"
        self.min_free_bytes = min_free_bytes
        for folder in (self.incoming, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leftovers of a crash before the commit point were never acknowledged.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        for meta in self.incoming.glob("*.json"):
            if not meta.with_suffix(".eml").exists():
                meta.unlink()

    def accept(self, raw: bytes, meta: dict[str, Any]) -> SpoolEntry:
        """Durably store one message; raise SpoolFullError or ServerError, never half."""
        free = shutil.disk_usage(self.root).free
        if free - len(raw) < self.min_free_bytes:
            raise SpoolFullError("insufficient storage, try again later")
        entry_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        meta = {**meta, "id": entry_id}
        tmp_eml, tmp_meta = self.tmp / f"{entry_id}.eml", self.tmp / f"{entry_id}.json"
        try:
            _write_synced(tmp_meta, json.dumps(meta).encode())
            _write_synced(tmp_eml, raw)
            tmp_meta.rename(self.incoming / tmp_meta.name)
            tmp_eml.rename(self.incoming / tmp_eml.name)  # the commit point
            fsync_dir(self.incoming)
        except OSError as exc:
            for p in (tmp_eml, tmp_meta, self.incoming / tmp_meta.name):
                p.unlink(missing_ok=True)
            raise ServerError("could not store the message") from exc
        return SpoolEntry(entry_id, self.incoming / f"{entry_id}.eml", meta)

    def pending(self) -> list[SpoolEntry]:
        entries = []
        for eml in sorted(self.incoming.glob("*.eml")):
            meta_path = eml.with_suffix(".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            entries.append(SpoolEntry(eml.stem, eml, meta))
        return entries

    def finish(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)
        entry.path.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(self.incoming)
