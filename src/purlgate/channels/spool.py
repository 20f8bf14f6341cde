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

An entry that cannot be handled moves to ``dead/`` (``<id>.msg`` beside ``<id>.json``,
the reason); ``requeue`` moves it back to ``incoming/`` and counts the times, so its
next answer is a new reply and not one the outbox already sent. A file in ``incoming/``
whose envelope line is damaged is still listed (meta ``{"damaged": true}``): the worker
dead-letters it instead of passing over it forever.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from purlgate.core.files import GroupSync, fsync_dir, start_writeback, write_json
from purlgate.errors import ServerError, SpoolFullError
from purlgate.faults import crash_point

WRITEBACK_BYTES = 4 << 20  # a message this big starts going to disk while it arrives
HEAD_BYTES = 64 << 10  # the body's first bytes kept in memory: the header block, usually

MAGIC = b"PURLGATE-ENVELOPE "


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    path: Path
    meta: dict[str, Any]  # channel, mail_from, rcpt_tos, size

    @property
    def body_offset(self) -> int:
        """Where the message starts in the file (after the envelope line)."""
        with self.path.open("rb") as f:
            f.readline()
            return f.tell()

    @property
    def raw(self) -> bytes:
        with self.path.open("rb") as f:
            f.readline()
            return f.read()


class SpoolWriter:
    """One message as it arrives: appended to ``tmp/<id>.msg`` (never held whole in
    memory), then committed (fsync, rename into ``incoming/``, folder sync) or discarded.
    The file is made at the first write, so a small message costs its session one trip
    to the disk (write, check, commit together). Every failure leaves nothing behind;
    a full disk is a SpoolFullError (452)."""

    def __init__(self, spool: Spool, entry_id: str, meta: dict[str, Any]) -> None:
        self.spool = spool
        self.id = entry_id
        self.meta = meta
        self.tmp = spool.tmp / f"{entry_id}.msg"
        self.size = 0
        self._written_back = 0  # body bytes handed to the kernel's writeback so far
        self._file: BinaryIO | None = None
        self._body_at = 0
        self._head = b""  # the first HEAD_BYTES of the body

    @property
    def started(self) -> bool:
        """Whether its file was made (at the first write)."""
        return self._file is not None

    def _open(self) -> BinaryIO:
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb")
            self._file.write(MAGIC + json.dumps(self.meta).encode() + b"\n")
            self._body_at = self._file.tell()
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise _storage(exc) from exc
        return self._file

    def write(self, data: bytes | bytearray) -> None:
        out = self._file or self._open()
        if len(self._head) < HEAD_BYTES:
            self._head += bytes(data[:HEAD_BYTES - len(self._head)])
        try:
            out.write(data)
            if self.size + len(data) - self._written_back >= WRITEBACK_BYTES:
                # A big message goes to disk as it arrives: the commit's fsync then has
                # only the tail left, and the final dot's answer does not wait for it.
                out.flush()
                start_writeback(out.fileno(), 0, 0)  # 0: to the end of the file
                self._written_back = self.size + len(data)
        except OSError as exc:
            raise _storage(exc) from exc
        self.size += len(data)

    def headers(self, limit: int = 1 << 20) -> bytes:
        """The message's header block (up to ``limit`` bytes): from memory when it ends
        within the body's first HEAD_BYTES, else read back from disk."""
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            return self._head[: end + 4]
        if self._file is None or self.size <= len(self._head):
            return self._head  # all of it is header (no blank line)
        try:
            self._file.flush()
            with self.tmp.open("rb") as f:
                f.seek(self._body_at)
                head = f.read(limit)
        except OSError as exc:
            raise _storage(exc) from exc
        end = head.find(b"\r\n\r\n")
        return head if end < 0 else head[: end + 4]

    @contextlib.contextmanager
    def reader(self) -> Iterator[BinaryIO]:
        """The message written so far, to read from its first line (the sender checks
        read it once, a piece at a time)."""
        if self._file is None:
            yield io.BytesIO(b"")
            return
        try:
            self._file.flush()
            f = self.tmp.open("rb")
        except OSError as exc:
            raise _storage(exc) from exc
        with f:
            f.seek(self._body_at)
            yield f

    def commit(self) -> SpoolEntry:
        out = self._file or self._open()  # an empty message still gets its file
        final = self.spool.incoming / self.tmp.name
        try:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            self.tmp.rename(final)  # the commit point, made durable by the folder sync
            self.spool.sync()
            crash_point("spool-committed")
        except OSError as exc:
            self.discard()
            final.unlink(missing_ok=True)
            raise _storage(exc) from exc
        return SpoolEntry(self.id, final, {**self.meta, "size": self.size})

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self.tmp.unlink(missing_ok=True)


def _storage(exc: OSError) -> ServerError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError("insufficient storage, try again later")
    return ServerError("could not store the message")


class Spool:
    def __init__(self, root: Path, *, min_free_bytes: int = 0, owner: bool = True,
                 tmp: Path | None = None) -> None:
        """``tmp``: where messages arrive (default ``root/tmp``); with other instances
        sharing the spool, this instance's own (what it clears at start is its own)."""
        self.root = root
        self.incoming = root / "incoming"
        self.tmp = tmp or root / "tmp"
        self.dead = root / "dead"
        self.min_free_bytes = min_free_bytes
        for folder in (self.incoming, self.tmp, self.dead):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leftovers of a crash before the commit point were never acknowledged (only
        # the gateway owns them: a command beside a running gateway must not touch them).
        for leftover in self.tmp.iterdir() if owner else ():
            leftover.unlink(missing_ok=True)
        self._sync = GroupSync(self.incoming)
        self.sync = self._sync.sync

    def begin(self, meta: dict[str, Any]) -> SpoolWriter:
        """Start receiving one message into ``tmp/``; SpoolFullError below the floor."""
        if shutil.disk_usage(self.root).free < self.min_free_bytes:
            raise SpoolFullError("insufficient storage, try again later")
        entry_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        return SpoolWriter(self, entry_id, {**meta, "id": entry_id})

    def accept(self, raw: bytes, meta: dict[str, Any]) -> SpoolEntry:
        """Durably store one message held in memory (IMAP); see ``SpoolWriter``."""
        writer = self.begin(meta)
        try:
            writer.write(raw)
        except BaseException:
            writer.discard()
            raise
        return writer.commit()

    def pending(self) -> list[SpoolEntry]:
        entries = []
        for path in sorted(self.incoming.glob("*.msg")):
            try:
                with path.open("rb") as f:
                    first = f.readline(64 * 1024)
            except FileNotFoundError:
                continue  # finished meanwhile
            found: object = None
            if first.startswith(MAGIC):
                with contextlib.suppress(ValueError):
                    found = json.loads(first[len(MAGIC):])
            meta: dict[str, Any] = found if isinstance(found, dict) else {"damaged": True}
            if "size" not in meta:  # streamed: the size was not known when the line was
                with contextlib.suppress(FileNotFoundError):
                    meta["size"] = path.stat().st_size - len(first)
            meta["requeued"] = self.requeued(path.stem)
            entries.append(SpoolEntry(path.stem, path, meta))
        return entries

    def finish(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)
        (self.incoming / f"{entry.id}.requeued").unlink(missing_ok=True)

    # -- the dead-letter folder -----------------------------------------------------------

    def requeued(self, entry_id: str) -> int:
        """How many times an operator put this entry back from the dead-letter folder."""
        try:
            return int((self.incoming / f"{entry_id}.requeued").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def dead_letter(self, entry: SpoolEntry, reason: dict[str, Any]) -> None:
        """Move an entry to ``dead/`` with its reason (the reason first: the move is the
        commit point, and a crash before it only repeats the whole step)."""
        write_json(self.dead / f"{entry.id}.json", {**reason, "requeued": self.requeued(
            entry.id)})
        entry.path.replace(self.dead / entry.path.name)
        (self.incoming / f"{entry.id}.requeued").unlink(missing_ok=True)
        fsync_dir(self.dead)

    def dead_entries(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for path in sorted(self.dead.glob("*.msg")):
            try:
                reason = json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                reason = {"error": "reason unreadable"}
            found.append((path.stem, reason))
        return found

    def requeue(self, entry_id: str) -> None:
        """Put a dead letter back in ``incoming/``; KeyError if there is none."""
        source = self.dead / f"{entry_id}.msg"
        if "/" in entry_id or entry_id.startswith(".") or not source.exists():
            raise KeyError(entry_id)
        reason = json.loads(source.with_suffix(".json").read_text())
        count = int(reason.get("requeued", 0)) + 1
        write_json(self.incoming / f"{entry_id}.requeued", count)
        source.replace(self.incoming / source.name)
        source.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(self.incoming)
