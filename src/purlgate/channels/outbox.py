"""The durable outbox: replies and notifications, retried until delivered or expired.

Each message is one file, ``queue/<id>.msg`` (its format: ``outbox_files.py``), written
through a hidden ``.part``, fsynced and renamed into place before ``enqueue`` returns:
the rename is its one commit point. A 4xx answer, a timeout or a refused connection is
retried with doubling delays (the attempts are kept in ``<id>.state`` beside it); a 5xx
or the expiry moves it to ``failed/`` and calls ``on_failed`` (the wiring alerts the
operator). An optional key makes enqueueing idempotent: the same key is queued at most
once, which is what lets a restarted worker re-enqueue safely. After the relay's 250
the entry moves to ``sent/`` (the record: never sent again); concurrent deliveries
share the folder fsync that makes the move durable. The previous release's layout is
converted at the first listing (``outbox_legacy.py``). Delivery goes through the
``Sender`` it is handed (``relay.py``); whoever made that sender closes it.

Several instances may share the folders (``leases`` set): each attempt is leased first
and reads the entry afresh, so an entry is tried by one instance at a time and one
another instance sent or deferred meanwhile is left as that one left it; the whole
folder is read more often, so that an instance that died has its queue delivered by
another soon after its leases run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from purlgate.channels.outbox_files import (
    Item,
    entry_id,
    read_item,
    write_entry,
    write_state,
)
from purlgate.channels.outbox_legacy import convert_folder
from purlgate.channels.queue_worker import give_back_memory
from purlgate.channels.relay import Sender
from purlgate.channels.relay_data import Outgoing
from purlgate.config import RelayConfig
from purlgate.core.files import GroupSync, fsync_dir
from purlgate.core.leases import Leases
from purlgate.errors import PermanentDeliveryError, StorageError, TemporaryDeliveryError
from purlgate.faults import crash_point

log = logging.getLogger("purlgate.outbox")

RESCAN_SECONDS = 30.0
ORPHAN_SECONDS = 600.0  # a state file without its entry older than this is removed
STORAGE_RETRY_SECONDS = 5.0

FailedHook = Callable[[Item, str, Path], None]  # the entry, why ("refused", "expired"),
# the folder it is kept in


class Outbox:
    def __init__(self, root: Path, relay: RelayConfig, *, sender: Sender,
                 clock: Callable[[], float] = time.time,
                 on_failed: FailedHook | None = None) -> None:
        self.root = root
        self.relay = relay
        self._send = sender
        self._clock = clock
        self.on_failed = on_failed
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
        self.leases: Leases | None = None  # set when other instances share the folders
        self.rescan_seconds = RESCAN_SECONDS
        # The largest message the relay takes (relay.RelayLimit.current), if known: a
        # larger one is never handed to it (replies past it went out as download links).
        self.limit: Callable[[], int | None] = lambda: None

    def share(self, leases: Leases) -> None:
        """Other instances deliver from the same folders (see the module docstring)."""
        self.leases = leases
        self.rescan_seconds = min(RESCAN_SECONDS, leases.seconds / 3)

    def _take(self, item: Item) -> Item | None:
        """Lease ``item`` for one attempt and read it afresh: None if another instance
        holds it, or sent, dropped or deferred it since it was listed (its lease then
        let go)."""
        assert self.leases is not None
        if not self.leases.claim("outbox", item.id):
            return None
        fresh = read_item(item.id, self.queue)
        if fresh is None or fresh.meta["next_at"] > self._clock():
            self.leases.release("outbox", item.id)
            return None
        return fresh

    # -- enqueue (any thread) -------------------------------------------------------

    def enqueue(self, message: EmailMessage, *, sender: str, recipients: Sequence[str],
                key: str | None = None, alert: bool = True,
                attachment: Path | None = None) -> bool:
        """Queue durably; False if ``key`` was queued before (then nothing is done).
        ``attachment``: a file written (base64, piece by piece) where the message has
        its one ``replies.PLACEHOLDER`` part body."""
        if not recipients:
            return False
        item_id = entry_id(key or make_msgid().strip("<>").split("@")[0])
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
            write_entry(self.queue / f"{item_id}.msg", envelope, message, attachment,
                        sync_dir=not deferred)
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
            item = read_item(item_id, self.queue)  # None: sent or dropped meanwhile
            if item is not None:
                found[item_id] = item
        return found

    def wake(self) -> None:
        """Look at the queue folder now (another process or thread queued something)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    # -- the folders -----------------------------------------------------------------

    def items(self) -> list[Item]:
        """Entries still to send. Also tidies what a crash or the previous release left:
        an attempts state whose entry is gone, a hidden ``.part`` never committed, and
        queue entries in the old two-file layout (converted)."""
        self._upgrade()
        found = []
        now = self._clock()
        for path in sorted(self.queue.glob("*")):
            if path.suffix == ".msg":
                item = read_item(path.stem, self.queue)
                if item is not None:
                    found.append(item)
            elif path.suffix == ".state" and not path.with_suffix(".msg").exists():
                # Its entry was delivered or failed before the state went (a crash
                # between): nothing to keep. A young one may be a requeue in progress.
                self._remove_if_old(path, now)
        for part in self.queue.glob(".*.part"):
            self._remove_if_old(part, now)  # a crash while writing (young: being written)
        return found

    @staticmethod
    def _remove_if_old(path: Path, now: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > ORPHAN_SECONDS:
                path.unlink()

    def _upgrade(self) -> None:
        """Entries of the previous release become this one's, once per Outbox, by the
        first that lists entries (see ``outbox_legacy``)."""
        with self._lock:
            if self._upgraded:
                return
            self._upgraded = True
            convert_folder(self.queue, queue=True, finished=(self.sent, self.failed))
            convert_folder(self.failed, queue=False, finished=())

    def failed_items(self) -> list[Item]:
        self._upgrade()
        return [item for p in sorted(self.failed.glob("*.msg"))
                if (item := read_item(p.stem, self.failed)) is not None]

    def _find(self, item_id: str, folder: Path) -> Item:
        item = read_item(item_id, folder)
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
            write_state(item, self.queue)
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
            write_state(item, self.queue)
            item.path.replace(self.queue / item.path.name)  # the commit point
            fsync_dir(self.queue)
            (self.failed / f"{item_id}.state").unlink(missing_ok=True)
        self.wake()

    def _move(self, item: Item, folder: Path) -> None:
        """A queued entry to ``folder`` (failed/) with its state: the state first, then
        the entry (the record), then the queue's state goes."""
        write_state(item, folder)
        with contextlib.suppress(FileNotFoundError):  # a scan finished it off already
            item.path.replace(folder / item.path.name)
        fsync_dir(folder)
        (self.queue / f"{item.id}.state").unlink(missing_ok=True)

    # -- delivery (the event loop) ----------------------------------------------------

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
        limit, size = await asyncio.to_thread(lambda: (self.limit(), _size(item)))
        if limit is not None and size > limit:
            meta["last_error"] = (f"larger than the relay takes ({size} bytes; its limit is "
                                  f"{limit}): not handed to it")
            log.error("outbox %s: %s", item.id, meta["last_error"])
            await asyncio.to_thread(self._fail, item, "refused")
            return "failed"
        meta["attempts"] += 1
        message = await asyncio.to_thread(Outgoing.of_entry, item.path)
        try:
            await self._hand_over(message, meta)
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
            await asyncio.to_thread(write_state, item, self.queue)
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

    async def _hand_over(self, message: Outgoing, meta: dict[str, Any]) -> None:
        try:
            await self._send(message, meta["sender"], meta["recipients"])
        finally:
            if message.size >= BIG_MESSAGE:
                # Its pieces went through the heap: hand back what they left free.
                await asyncio.to_thread(give_back_memory)

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
        if self.on_failed is not None:
            self.on_failed(item, why, self.failed)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``: up to ``relay.max_connections`` messages at once; wakes
        on new messages, on a deferral and on retry deadlines; at ``stop`` the attempts
        in flight finish. The queue is kept in memory: new entries are read as they are
        queued, the whole folder every RESCAN_SECONDS (what the outbox command changed)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        rounds = _Rounds(self, asyncio.Semaphore(self.relay.max_connections), self._wake)
        while not stop.is_set():
            self._wake.clear()
            next_due = await rounds.refresh()
            next_due = await rounds.start_due(stop, next_due)
            # At most 30 s asleep: `purlgate outbox --retry-now` edits files from outside
            # (less with other instances: see the module docstring).
            most = self.rescan_seconds
            timeout = min(next_due, most) if next_due is not None else most
            await _first_of(self._wake, stop, timeout)
        await rounds.finish()


async def _first_of(wake: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()


BIG_MESSAGE = 1 << 20  # past this, the heap an attempt used is handed back to the system


class _Rounds:
    """The state of ``Outbox.run``: the queue in memory, the attempts in flight."""

    def __init__(self, outbox: Outbox, slots: asyncio.Semaphore, wake: asyncio.Event) -> None:
        self.outbox = outbox
        self.slots = slots
        self.wake = wake
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.index: dict[str, Item] = {}
        self.scanned = float("-inf")

    async def refresh(self) -> float | None:
        """Read what is new (or the whole folder when due); a storage fault returns the
        seconds until the next look."""
        box = self.outbox
        with box._lock:
            fresh, box._fresh = box._fresh, []
        try:
            if box._rescan or time.monotonic() - self.scanned >= box.rescan_seconds:
                box._rescan = False
                self.index = {item.id: item for item in await asyncio.to_thread(box.items)}
                self.scanned = time.monotonic()
            elif fresh:
                self.index.update(await asyncio.to_thread(box._load, fresh))
        except (OSError, StorageError) as exc:
            _storage_fault(exc)
            with box._lock:
                box._fresh.extend(fresh)
            return STORAGE_RETRY_SECONDS
        return None

    async def start_due(self, stop: asyncio.Event, next_due: float | None) -> float | None:
        """Start an attempt for each due entry while a connection is free; the seconds
        until the next entry is due."""
        clock = self.outbox._clock
        for item in sorted(self.index.values(), key=lambda i: i.meta["next_at"]):
            if item.id in self.in_flight or stop.is_set():
                continue
            if item.meta["next_at"] > clock():
                # Sorted: the rest are later still.
                wait = float(item.meta["next_at"]) - clock()
                return wait if next_due is None else min(next_due, wait)
            await self.slots.acquire()  # a free connection: one in flight ended
            self.in_flight[item.id] = asyncio.create_task(self.attempt(item))
        return next_due

    async def attempt(self, item: Item) -> None:
        box = self.outbox
        leased = False
        try:
            if box.leases is not None:
                taken = await asyncio.to_thread(box._take, item)
                if taken is None:  # another instance's now; a later full read shows it
                    self.index.pop(item.id, None)
                    return
                item, leased = taken, True
            if await box._attempt(item) != "deferred":
                self.index.pop(item.id, None)
            elif leased:
                self.index[item.id] = item  # as read afresh, with its new next try
        except (OSError, StorageError) as exc:
            # A full or failing disk: the entry stays as it is on disk (read again),
            # tried again soon; never let it end the process.
            _storage_fault(exc)
            self.index.pop(item.id, None)
            with box._lock:
                box._fresh.append(item.id)
            asyncio.get_running_loop().call_later(STORAGE_RETRY_SECONDS, self.wake.set)
        finally:
            self.in_flight.pop(item.id, None)
            self.slots.release()
            if leased:
                await _release(box, item)

    async def finish(self) -> None:
        if self.in_flight:
            await asyncio.gather(*self.in_flight.values(), return_exceptions=True)


async def _release(box: Outbox, item: Item) -> None:
    assert box.leases is not None
    try:
        await asyncio.to_thread(box.leases.release, "outbox", item.id)
    except (OSError, StorageError) as exc:  # it then runs out by itself
        log.warning("outbox %s: could not release its lease (%s)", item.id,
                    getattr(exc, "message", None) or exc)


def _size(item: Item) -> int:
    try:
        return item.path.stat().st_size
    except OSError:
        return 0  # gone or unreadable: the attempt finds out


def _storage_fault(exc: BaseException) -> None:
    log.warning("outbox: storage fault (%s); trying again in %.0f s",
                getattr(exc, "message", None) or exc, STORAGE_RETRY_SECONDS)
