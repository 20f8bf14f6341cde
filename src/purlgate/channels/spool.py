"""The durable spool: a received message is on disk (fsynced) before we say yes.

One file per message, ``incoming/<id>.msg``: a first line ``PURLGATE-ENVELOPE <json>``
(channel, envelope sender and recipients, size) and then the raw message, byte for
byte. ``accept`` writes it under a temporary name, fsyncs it, renames it into
``incoming/`` (the commit point) and fsyncs the folder; only then may SMTP answer 250
or IMAP move the message. Folder fsyncs are group-committed: concurrent sessions whose
renames happened before one fsync started share it, which keeps acceptance close to
one fsync per message. ``finish`` deletes an entry once its reply is queued; a deletion
lost in a crash only brings the entry back, and it is then answered from the batch
store and the outbox keys, not processed twice.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purlgate.core.files import fsync_dir
from purlgate.errors import ServerError
from purlgate.faults import crash_point

MAGIC = b"PURLGATE-ENVELOPE "


class SpoolFullError(ServerError):
    code = "spool-full"
    smtp_code = 452
    smtp_status = "4.3.1"


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    path: Path
    meta: dict[str, Any]  # channel, mail_from, rcpt_tos, size

    @property
    def raw(self) -> bytes:
        with self.path.open("rb") as f:
            f.readline()
            return f.read()


class GroupSync:
    """fsync a folder for many callers at once: one sync covers every earlier rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._completed < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested  # every rename before this point
                self._cond.release()
                try:
                    fsync_dir(self.folder)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._completed = max(self._completed, covers)


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
        self._sync = GroupSync(self.incoming)

    def accept(self, raw: bytes, meta: dict[str, Any]) -> SpoolEntry:
        """Durably store one message; raise SpoolFullError or ServerError, never half."""
        free = shutil.disk_usage(self.root).free
        if free - len(raw) < self.min_free_bytes:
            raise SpoolFullError("insufficient storage, try again later")
        entry_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        meta = {**meta, "id": entry_id, "size": len(raw)}
        tmp = self.tmp / f"{entry_id}.msg"
        final = self.incoming / tmp.name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + json.dumps(meta).encode() + b"\n")
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(final)  # the commit point, made durable by the folder sync
            self._sync.sync()
            crash_point("spool-committed")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise ServerError("could not store the message") from exc
        return SpoolEntry(entry_id, final, meta)

    def pending(self) -> list[SpoolEntry]:
        entries = []
        for path in sorted(self.incoming.glob("*.msg")):
            with path.open("rb") as f:
                first = f.readline()
            if first.startswith(MAGIC):
                entries.append(SpoolEntry(path.stem, path, json.loads(first[len(MAGIC):])))
        return entries

    def finish(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)
