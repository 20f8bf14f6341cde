"""The durable outbox: replies and notifications, retried until delivered or expired.

Each message is one file, ``queue/<id>.msg``: a line of JSON (its envelope: sender,
recipients, when it was queued), then the message as sent, byte for byte on every try
(so the Message-ID never changes). It is written through a hidden ``.part``, fsynced
and renamed into place before ``enqueue`` returns: the rename is its one commit point.
A 4xx answer, a timeout or a refused connection is retried with doubling delays (the
attempts are kept in ``<id>.state`` beside it); a 5xx or the expiry moves it to
``failed/`` and alerts the operator. An optional key makes enqueueing idempotent: the
same key is queued at most once, which is what lets a restarted worker re-enqueue
safely. After the relay's 250 the entry moves to ``sent/`` (the record: never sent
again); concurrent deliveries share the folder fsync that makes the move durable.
The previous release's two files per entry (``.eml`` + ``.json``) are converted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, BinaryIO

import aiosmtplib

from purlgate.channels.replies import PLACEHOLDER, new_message, set_text
from purlgate.channels.spool import GroupSync
from purlgate.config import RelayConfig
from purlgate.core.files import AtomicFile, fsync_dir
from purlgate.errors import PermanentDeliveryError, StorageError, TemporaryDeliveryError
from purlgate.faults import crash_point

log = logging.getLogger("purlgate.outbox")
KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


Sender = Callable[[bytes, str, Sequence[str]], Awaitable[None]]


REUSE_SECONDS = 300.0  # a connection's whole life (Postfix's smtp_connection_reuse_time_limit)


@dataclass
class _Kept:
    client: aiosmtplib.SMTP
    opened: float
    used: float


class RelayConnections:
    """Deliver through the configured relay; failures sorted into temporary/permanent.

    As Postfix's connection cache: after a delivery its connection is kept for the next
    message, for ``keep_connections_seconds`` (then closed with QUIT) and at most 300 s
    in all; a kept connection is checked with RSET before it carries a message, so a
    relay that closed it meanwhile costs a new connection, never the message. One
    message per connection at a time; the outbox bounds how many are open.
    """

    def __init__(self, relay: RelayConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.relay = relay
        self._password = relay.password.reveal().decode() if relay.password else None
        self._clock = clock
        self._kept: list[_Kept] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Task[None]] = set()

    async def __call__(self, data: bytes, sender: str, recipients: Sequence[str]) -> None:
        try:
            kept = await self._connection()
            try:
                await kept.client.sendmail(sender, list(recipients), data)
            except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPResponseException):
                # aiosmtplib has reset the envelope: the connection can carry the next.
                self._keep(kept)
                raise
            except BaseException:
                kept.client.close()
                raise
            self._keep(kept)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(500 <= c < 600 for c in codes):
                raise PermanentDeliveryError(f"recipients refused ({codes})") from exc
            raise TemporaryDeliveryError(f"recipients deferred ({codes})") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                raise PermanentDeliveryError(f"relay answered {exc.code}") from exc
            raise TemporaryDeliveryError(f"relay answered {exc.code}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TemporaryDeliveryError(f"relay unreachable: {type(exc).__name__}") from exc

    async def _connection(self) -> _Kept:
        """The most recently used kept connection that still answers RSET, or a new one."""
        while self._kept:
            kept = self._kept.pop()
            if self._usable(kept):
                try:
                    await kept.client.rset(timeout=min(20.0, self.relay.timeout_seconds))
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    kept.client.close()  # closed by the relay meanwhile: not our message's fault
                    continue
                return kept
            await self._quit(kept)
        relay = self.relay
        client = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, start_tls=relay.starttls,
            username=relay.username, password=self._password, timeout=relay.timeout_seconds,
            cert_bundle=str(relay.ca_file) if relay.ca_file else None)
        try:
            await client.connect()
        except BaseException:
            client.close()
            raise
        now = self._clock()
        return _Kept(client, now, now)

    def _usable(self, kept: _Kept) -> bool:
        now = self._clock()
        return (kept.client.is_connected
                and now - kept.used < self.relay.keep_connections_seconds
                and now - kept.opened < REUSE_SECONDS)

    def _keep(self, kept: _Kept) -> None:
        kept.used = self._clock()
        if not self._usable(kept):
            self._quit_later(kept)
            return
        self._kept.append(kept)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(
                self.relay.keep_connections_seconds, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections kept longer than their time; look again later."""
        self._sweep = None
        stale = [k for k in self._kept if not self._usable(k)]
        self._kept = [k for k in self._kept if k not in stale]
        for kept in stale:
            self._quit_later(kept)
        loop = asyncio.get_running_loop()
        if self._kept:
            wait = min(k.used for k in self._kept) + self.relay.keep_connections_seconds
            self._sweep = loop.call_at(loop.time() + max(0.05, wait - self._clock()),
                                       self._close_idle)

    def _quit_later(self, kept: _Kept) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(kept))
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def _quit(self, kept: _Kept) -> None:
        try:
            if kept.client.is_connected:
                await asyncio.wait_for(kept.client.quit(), timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            kept.client.close()

    async def close(self) -> None:
        """QUIT every kept connection (at shutdown)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        kept, self._kept = self._kept, []
        await asyncio.gather(*(self._quit(k) for k in kept), *self._quitting)


def relay_sender(relay: RelayConfig) -> RelayConnections:
    """Deliver through the configured relay (over kept connections)."""
    return RelayConnections(relay)


@dataclass
class Item:
    id: str
    path: Path  # the .msg: its envelope line, then the message as sent
    meta: dict[str, Any]  # the envelope, with the attempts state over it


def write_message(out: BinaryIO, message: EmailMessage, attachment: Path | None) -> None:
    """The message as sent (CRLF), with ``attachment`` streamed in base64 in place of
    the placeholder part's body (76-character lines, as the email package writes)."""
    # With the message's own policy (ours: see replies.MAIL_POLICY), lines ended by CRLF.
    raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    if attachment is None:
        out.write(raw)
        return
    marker = base64.b64encode(PLACEHOLDER)
    at = raw.rindex(marker)  # the last part: a copied Subject cannot come after it
    out.write(raw[:at])
    with attachment.open("rb") as f:
        while piece := f.read(57 * 1024):  # 57 bytes make one 76-character line
            out.write(base64.encodebytes(piece).replace(b"\n", b"\r\n"))
    out.write(raw[at + len(marker) + 2:])  # past the marker's own CRLF


RESCAN_SECONDS = 30.0
# An entry's attempts state (over its envelope line); it moves with the entry to failed/.
STATE_KEYS = ("attempts", "next_at", "last_error", "created_at")
ORPHAN_SECONDS = 600.0  # a state file without its entry older than this is removed


def _message_bytes(path: Path) -> bytes:
    """The message of an entry file, as sent (the file less its envelope line)."""
    with path.open("rb") as f:
        f.readline(1 << 16)
        return f.read()
STORAGE_RETRY_SECONDS = 5.0


class Outbox:
    def __init__(self, root: Path, relay: RelayConfig, *, sender: Sender,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.relay = relay
        self._send = sender
        self._clock = clock
        self.queue, self.sent, self.failed = root / "queue", root / "sent", root / "failed"
        for folder in (self.queue, self.sent, self.failed):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._commit = threading.local()  # see one_commit
        self._sent_sync = GroupSync(self.sent)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Entries queued since the running loop last looked (it reads just these, not
        # the whole folder, which it scans only every RESCAN_SECONDS).
        self._fresh: list[str] = []
        # In a worker process: what it queued, for the gateway's outbox to ``adopt``.
        self.enqueued: list[str] | None = None
        self._rescan = False
        self._upgraded = False

    # -- the files -------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any], int]:
        """An entry's envelope (its first line) and where its message starts."""
        with path.open("rb") as f:
            line = f.readline(1 << 16)
        if not line.endswith(b"\n"):
            raise ValueError("no envelope line")
        envelope = json.loads(line)
        if not isinstance(envelope, dict):
            raise ValueError("the envelope line is not an object")  # noqa: TRY004 - read as unreadable JSON
        return envelope, len(line)

    def _item(self, item_id: str, folder: Path) -> Item | None:
        """The entry ``item_id`` in ``folder`` with its state, or None (not there, or
        unreadable: left for an operator, logged)."""
        path = folder / f"{item_id}.msg"
        try:
            meta, _ = self._read(path)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("outbox %s: its file is unreadable; left for an operator", item_id)
            return None
        try:
            meta.update(json.loads(path.with_suffix(".state").read_text()))
        except FileNotFoundError:
            pass  # never tried yet
        except ValueError:
            log.warning("outbox %s: its attempts state is unreadable; counted afresh",
                        item_id)
        meta.setdefault("attempts", 0)
        meta.setdefault("next_at", meta["created_at"])
        meta.setdefault("last_error", None)
        return Item(item_id, path, meta)

    def _write_state(self, item: Item, folder: Path) -> None:
        state = {k: item.meta[k] for k in STATE_KEYS if k in item.meta}
        with AtomicFile(folder / f"{item.id}.state", no_clobber=False) as out:
            out.file.write(json.dumps(state).encode())
            out.commit()

    # -- enqueue (any thread) -------------------------------------------------------

    def enqueue(self, message: EmailMessage, *, sender: str, recipients: Sequence[str],
                key: str | None = None, alert: bool = True,
                attachment: Path | None = None) -> bool:
        """Queue durably; False if ``key`` was queued before (then nothing is done).
        ``attachment``: a file written (base64, piece by piece) where the message has
        its one ``replies.PLACEHOLDER`` part body."""
        if not recipients:
            return False
        item_id = key or make_msgid().strip("<>").split("@")[0]
        item_id = "".join(c if c in KEY_CHARS else "_" for c in item_id.lower())
        with self._lock:
            if self._known(item_id):
                return False
            if "Message-ID" not in message:
                message["Message-ID"] = make_msgid(domain=sender.rsplit("@", maxsplit=1)[-1])
            if "Date" not in message:
                message["Date"] = formatdate(localtime=False, usegmt=True)
            envelope = {"sender": sender, "recipients": list(recipients),
                        "created_at": self._clock(), "alert": alert}
            # One file, one commit point: its rename into the queue (a crash before it
            # leaves only the hidden .part, replaced by the next enqueue of this key).
            deferred = getattr(self._commit, "depth", 0) > 0
            with AtomicFile(self.queue / f"{item_id}.msg", no_clobber=False,
                            sync_dir=not deferred) as out:
                out.file.write(json.dumps(envelope).encode() + b"\n")
                # CRLF, as on the wire: the stored file is exactly what every try sends.
                write_message(out.file, message, attachment)
                out.commit()
            if deferred:
                self._commit.pending = True
            crash_point("outbox-queued")
            if self._loop is not None:  # else the loop's first scan finds it
                self._fresh.append(item_id)
            if self.enqueued is not None:
                self.enqueued.append(item_id)
        self.wake()
        return True

    @contextlib.contextmanager
    def one_commit(self) -> Iterator[None]:
        """Entries this thread queues inside are made durable together when it ends:
        each ``enqueue`` fsyncs its file, and the queue folder (which makes the renames
        durable) is fsynced once at the end. For a worker that queues a message's
        notifications and reply, then lets the message go. One sent before the end (a
        gateway with worker threads sees it at once) and lost to a power cut is simply
        not sent again."""
        self._commit.depth = getattr(self._commit, "depth", 0) + 1
        try:
            yield
        finally:
            self._commit.depth -= 1
            if self._commit.depth == 0 and getattr(self._commit, "pending", False):
                self._commit.pending = False
                fsync_dir(self.queue)

    def _known(self, item_id: str) -> bool:
        """Queued, sent or failed already (also in the previous release's layout)."""
        return any((folder / f"{item_id}{suffix}").exists()
                   for folder in (self.queue, self.sent, self.failed)
                   for suffix in (".msg", ".json"))

    def adopt(self, item_ids: Sequence[str]) -> None:
        """Entries another process queued in our folder: delivered without a rescan."""
        with self._lock:
            self._fresh.extend(item_ids)
        self.wake()

    def rescan(self) -> None:
        """Read the whole queue folder at the next look (something may have been queued
        by a process that could not say what)."""
        self._rescan = True
        self.wake()

    def _load(self, item_ids: Sequence[str]) -> dict[str, Item]:
        found = {}
        for item_id in dict.fromkeys(item_ids):
            item = self._item(item_id, self.queue)  # None: sent or dropped meanwhile
            if item is not None:
                found[item_id] = item
        return found

    def wake(self) -> None:
        """Look at the queue folder now (another process or thread queued something)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    # -- delivery (the event loop) ----------------------------------------------------

    def items(self) -> list[Item]:
        """Entries still to send. Also tidies what a crash or the previous release left:
        an attempts state whose entry is gone, and queue entries in the old two-file
        layout (converted)."""
        self._upgrade()
        found = []
        now = time.time()
        for path in sorted(self.queue.glob("*")):
            if path.suffix == ".msg":
                item = self._item(path.stem, self.queue)
                if item is not None:
                    found.append(item)
            elif path.suffix == ".state" and not path.with_suffix(".msg").exists():
                # Its entry was delivered or failed before the state went (a crash
                # between): nothing to keep. A young one may be a requeue in progress.
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > ORPHAN_SECONDS:
                        path.unlink()
        for part in self.queue.glob(".*.part"):
            # Left by a crash while writing (one still being written is young).
            with contextlib.suppress(FileNotFoundError):
                if now - part.stat().st_mtime > ORPHAN_SECONDS:
                    part.unlink()
        return found

    def _upgrade(self) -> None:
        """Entries of the previous release (``<id>.eml`` + ``<id>.json``, the .json the
        commit point) become ``<id>.msg`` (+ ``.state``): queued and failed ones, so
        that one layout is sent and listed; sent records stay as they are (read by
        ``_known`` and the sweep). Once per Outbox, by the first that lists entries."""
        with self._lock:
            if self._upgraded:
                return
            self._upgraded = True
            for folder in (self.queue, self.failed):
                self._upgrade_folder(folder)

    def _upgrade_folder(self, folder: Path) -> None:
        for meta_path in sorted(folder.glob("*.json")):
            eml = meta_path.with_suffix(".eml")
            if folder == self.queue and any(
                    (f / meta_path.name).exists() for f in (self.sent, self.failed)):
                meta_path.unlink(missing_ok=True)  # finished before a crash
                eml.unlink(missing_ok=True)
                continue
            try:
                meta = json.loads(meta_path.read_text())
                body = eml.read_bytes()
            except FileNotFoundError:
                continue  # gone meanwhile, or a record without its body: left as it is
            except ValueError:
                log.warning("outbox %s: its .json is unreadable; left for an operator",
                            meta_path.stem)
                continue
            item = Item(meta_path.stem, folder / f"{meta_path.stem}.msg", meta)
            if meta.get("attempts") or folder == self.failed:
                self._write_state(item, folder)
            envelope = {k: meta[k] for k in ("sender", "recipients", "created_at",
                                             "alert") if k in meta}
            with AtomicFile(item.path, no_clobber=False) as out:
                out.file.write(json.dumps(envelope).encode() + b"\n" + body)
                out.commit()
            meta_path.unlink()
            eml.unlink(missing_ok=True)
            log.info("outbox %s: converted from the previous release's layout",
                     item.id)
        for eml in folder.glob("*.eml"):
            if not eml.with_suffix(".json").exists() and folder == self.queue:
                eml.unlink(missing_ok=True)  # never committed (no .json)

    def failed_items(self) -> list[Item]:
        self._upgrade()
        return [item for p in sorted(self.failed.glob("*.msg"))
                if (item := self._item(p.stem, self.failed)) is not None]

    def _find(self, item_id: str, folder: Path) -> Item:
        item = self._item(item_id, folder)
        if item is None:
            raise KeyError(item_id)
        return item

    def sweep_sent(self, max_age_seconds: float) -> int:
        """Delete sent mail (its ZIPs hold client data) older than ``max_age_seconds``:
        a record's time is when it moved to sent/ (its ctime), or for a record of the
        previous release, the delivery time it holds."""
        cutoff = self._clock() - max_age_seconds
        removed = 0
        for path in self.sent.iterdir():
            try:
                if path.suffix == ".msg":
                    delivered = path.stat().st_ctime
                elif path.suffix == ".json":
                    meta = json.loads(path.read_text())
                    delivered = meta.get("delivered_at") or path.stat().st_ctime
                else:
                    continue
            except (OSError, ValueError):
                continue
            if delivered < cutoff:
                path.with_suffix(".eml").unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def retry_now(self, item_id: str) -> None:
        """Make a queued message due now (a running outbox picks it up within 30 s)."""
        with self._lock:
            item = self._find(item_id, self.queue)
            item.meta["next_at"] = self._clock()
            self._write_state(item, self.queue)
        self.wake()

    def drop(self, item_id: str) -> None:
        """Stop trying a queued message: it moves to failed/, marked dropped."""
        with self._lock:
            item = self._find(item_id, self.queue)
            item.meta["last_error"] = "dropped by an operator"
            self._move(item, self.failed)

    def requeue(self, item_id: str) -> None:
        """Send a failed message again, from scratch (attempts and expiry reset)."""
        with self._lock:
            item = self._find(item_id, self.failed)
            now = self._clock()
            item.meta.update(attempts=0, next_at=now, created_at=now, last_error=None)
            self._write_state(item, self.queue)
            item.path.replace(self.queue / item.path.name)  # the commit point
            fsync_dir(self.queue)
            (self.failed / f"{item_id}.state").unlink(missing_ok=True)
        self.wake()

    def _move(self, item: Item, folder: Path) -> None:
        """A queued entry to ``folder`` (failed/) with its state: the state first, then
        the entry (the record), then the queue's state goes."""
        self._write_state(item, folder)
        with contextlib.suppress(FileNotFoundError):  # a scan finished it off already
            item.path.replace(folder / item.path.name)
        fsync_dir(folder)
        (self.queue / f"{item.id}.state").unlink(missing_ok=True)

    async def deliver_due(self) -> float | None:
        """Try every message that is due, one after another; return seconds until the
        next one is (the tests' way in; ``run`` delivers several at once)."""
        for item in await asyncio.to_thread(self.items):
            if item.meta["next_at"] <= self._clock():
                await self._attempt(item)
        waiting = [item.meta["next_at"] for item in await asyncio.to_thread(self.items)]
        return max(0.0, min(waiting) - self._clock()) if waiting else None

    async def _attempt(self, item: Item) -> str:
        """One delivery try: "sent", "failed" or "deferred" (recorded on disk)."""
        meta = item.meta
        meta["attempts"] += 1
        data = await asyncio.to_thread(_message_bytes, item.path)
        try:
            await self._send(data, meta["sender"], meta["recipients"])
        except TemporaryDeliveryError as exc:
            meta["last_error"] = str(exc)
            if self._clock() - meta["created_at"] >= self.relay.expire_seconds:
                log.error("outbox %s expired after %d attempts: %s", item.id,  # noqa: TRY400 - expected, no trace
                          meta["attempts"], exc)
                await asyncio.to_thread(self._fail, item, "expired")
                return "failed"
            delay = min(self.relay.retry_first_seconds * 2 ** (meta["attempts"] - 1),
                        self.relay.retry_max_seconds)
            meta["next_at"] = self._clock() + delay
            log.warning("outbox %s deferred (%s); retry in %.0f s", item.id, exc, delay)
            await asyncio.to_thread(self._write_state, item, self.queue)
            self.wake()  # a running loop plans its next look with the new deadline
            return "deferred"
        except PermanentDeliveryError as exc:
            meta["last_error"] = str(exc)
            log.error("outbox %s failed permanently: %s", item.id, exc)  # noqa: TRY400
            await asyncio.to_thread(self._fail, item, "refused")
            return "failed"
        crash_point("relay-accepted")
        log.info("outbox %s delivered after %d attempt(s)", item.id, meta["attempts"])
        await asyncio.to_thread(self._mark_sent, item)
        return "sent"

    def _mark_sent(self, item: Item) -> None:
        """Record a delivery: the entry moves to sent/ (the record: from then on it is
        never sent again), made durable by one folder fsync shared with the other
        deliveries of the moment; its attempts state, if any, goes. The record's time is
        its ctime."""
        with contextlib.suppress(FileNotFoundError):
            item.path.replace(self.sent / item.path.name)
        self._sent_sync.sync()
        (self.queue / f"{item.id}.state").unlink(missing_ok=True)

    def _fail(self, item: Item, why: str) -> None:
        with self._lock:
            self._move(item, self.failed)
        self._alert(item, why)

    def _alert(self, item: Item, why: str) -> None:
        if not item.meta.get("alert") or not self.relay.operator:
            return
        note = new_message()
        note["From"] = item.meta["sender"]
        note["To"] = self.relay.operator
        note["Subject"] = f"[purlgate] undeliverable message {item.id} ({why})"
        set_text(
            note,
            f"purlgate could not deliver outbox message {item.id}.\n"
            f"Recipients: {', '.join(item.meta['recipients'])}\n"
            f"Attempts: {item.meta['attempts']}\nLast error: {item.meta['last_error']}\n"
            f"The message is kept in {self.failed}.\n"
        )
        self.enqueue(note, sender=item.meta["sender"], recipients=[self.relay.operator],
                     key=f"alert-{item.id}", alert=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``: up to ``relay.max_connections`` messages at once; wakes
        on new messages, on a deferral and on retry deadlines; at ``stop`` the attempts
        in flight finish. The queue is kept in memory: new entries are read as they are
        queued, the whole folder every RESCAN_SECONDS (what the outbox command changed)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        wake = self._wake
        slots = asyncio.Semaphore(self.relay.max_connections)
        in_flight: dict[str, asyncio.Task[None]] = {}
        index: dict[str, Item] = {}
        scanned = float("-inf")

        async def attempt(item: Item) -> None:
            try:
                if await self._attempt(item) != "deferred":
                    index.pop(item.id, None)
            except (OSError, StorageError) as exc:
                # A full or failing disk: the entry stays as it is on disk (read again),
                # tried again soon; never let it end the process.
                log.warning("outbox: storage fault (%s); trying again in %.0f s",
                            getattr(exc, "message", None) or exc, STORAGE_RETRY_SECONDS)
                index.pop(item.id, None)
                with self._lock:
                    self._fresh.append(item.id)
                asyncio.get_running_loop().call_later(STORAGE_RETRY_SECONDS, wake.set)
            finally:
                in_flight.pop(item.id, None)
                slots.release()

        while not stop.is_set():
            wake.clear()
            next_due: float | None = None
            with self._lock:
                fresh, self._fresh = self._fresh, []
            try:
                if self._rescan or time.monotonic() - scanned >= RESCAN_SECONDS:
                    self._rescan = False
                    index = {item.id: item for item in await asyncio.to_thread(self.items)}
                    scanned = time.monotonic()
                elif fresh:
                    index.update(await asyncio.to_thread(self._load, fresh))
            except (OSError, StorageError) as exc:
                log.warning("outbox: storage fault (%s); trying again in %.0f s",
                            getattr(exc, "message", None) or exc, STORAGE_RETRY_SECONDS)
                with self._lock:
                    self._fresh.extend(fresh)
                next_due = STORAGE_RETRY_SECONDS
            for item in sorted(index.values(), key=lambda i: i.meta["next_at"]):
                if item.id in in_flight or stop.is_set():
                    continue
                if item.meta["next_at"] > self._clock():
                    wait = item.meta["next_at"] - self._clock()
                    next_due = wait if next_due is None else min(next_due, wait)
                    break  # sorted: the rest are later still
                await slots.acquire()  # a free connection: one in flight ended
                in_flight[item.id] = asyncio.create_task(attempt(item))
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
            # At most 30 s asleep: `purlgate outbox --retry-now` edits files from outside.
            timeout = min(next_due, RESCAN_SECONDS) if next_due is not None else RESCAN_SECONDS
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        if in_flight:
            await asyncio.gather(*in_flight.values(), return_exceptions=True)
        if isinstance(self._send, RelayConnections):
            await self._send.close()
