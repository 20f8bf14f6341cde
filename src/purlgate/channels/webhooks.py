"""Signed status webhooks: a batch's events, POSTed to its client's endpoints.

Queueing. A core subscriber (``Webhooks.__call__``, in whichever process runs the batch)
turns each event into one entry per endpoint that asked for its type (the client's
``webhooks`` and its project's): ``webhooks/queue/<entry>.json`` holds the endpoint, the
event's id and its JSON body (facts of the batch, never row data or links) and the
attempts. It is written through a hidden ``.part``, fsynced and renamed into place
before the batch goes on; the rename is the commit point. The event id comes from the
batch (region, id, creation time) and the event's type, so an event published again
after a crash is queued at most once, and a receiver that saw it drops the repeat.

Delivering. ``run`` POSTs each due entry (``webhook_post.py``: signed afresh at every
attempt, bounded in time, no redirect to another origin). A 2xx moves it to ``sent/``
(the record that it was delivered, swept after the region's retention). Any other answer,
a timeout or a refused connection is retried with doubling delays; at ``expire_seconds``
the entry moves to ``failed/`` and the operator is alerted (`purlgate webhooks` lists
and requeues). A 410 Gone stops the endpoint: the entry moves to ``failed/``, the
endpoint is recorded in ``gone/`` and its other entries follow without a request, until
`purlgate webhooks --revive URL`. An endpoint no longer configured is dropped likewise.

Several instances may share the folders (``leases`` set): an attempt is leased and its
entry read afresh first, as the outbox does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purlgate.channels.alerts import OperatorAlerts
from purlgate.config import (
    ClientConfig,
    WebhookConfig,
    WebhookDeliveryConfig,
    WebhookEvent,
    origin,
)
from purlgate.core.files import fsync_dir, write_json
from purlgate.core.leases import Leases
from purlgate.core.lifecycle import BatchEvent, BatchRecord, BatchState, EventKind
from purlgate.errors import ConfigError, StorageError

if TYPE_CHECKING:  # the HTTP client loads only where events are delivered (serve)
    from purlgate.channels.webhook_post import Answer, Poster

log = logging.getLogger("purlgate.webhooks")

RESCAN_SECONDS = 30.0
STORAGE_RETRY_SECONDS = 5.0


TYPES: Mapping[EventKind, WebhookEvent] = {
    EventKind.RECEIVED: "batch.received", EventKind.LOADED: "batch.loaded",
    EventKind.SUMMARY: "batch.done", EventKind.FAILED: "batch.failed",
    EventKind.VALIDATED: "validation.finished"}


def event_type(event: BatchEvent) -> WebhookEvent:
    """The webhook type of a core event."""
    if event.kind is EventKind.SUMMARY and event.batch.state is BatchState.DONE_WITH_ERRORS:
        return "batch.done_with_errors"
    return TYPES[event.kind]


def event_id(batch: BatchRecord, kind: str) -> str:
    """The ``webhook-id`` of an event: the same whenever it is published again, and
    another for a batch of the same number after a data folder was started afresh."""
    seed = f"{batch.region}|{batch.id}|{batch.created_at.isoformat()}|{kind}"
    return "msg_" + hashlib.sha256(seed.encode()).hexdigest()[:26]


def _entry_id(event: str, url: str) -> str:
    return f"{event}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _time(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def body(kind: WebhookEvent, batch: BatchRecord) -> dict[str, Any]:
    """What a receiver learns: the batch's facts and both files' SHA-256."""
    names = list(batch.outputs)
    errors = next((n for n in names if n.endswith(("_errors.csv", "_errors.csv.pgp"))), None)
    purl = None
    if batch.kind == "batch" and batch.state in (BatchState.DONE, BatchState.DONE_WITH_ERRORS):
        purl = next((n for n in names if n != errors and not n.endswith(".flg")), None)
    c = batch.counts
    return {
        "type": kind,
        "timestamp": _time(batch.updated_at),
        "data": {
            "batch_id": batch.id, "region": batch.region, "client": batch.client,
            "project": batch.project, "channel": batch.channel,
            "file": batch.received_name, "data_file": batch.data_name,
            "state": batch.state.value, "validation": batch.kind == "validation",
            "rows": {"total": c.rows_total, "ok": c.rows_ok, "errors": c.rows_error},
            "error": None if batch.reason is None and batch.error_code is None else
            {"code": batch.error_code, "summary": batch.reason},
            "received_sha256": batch.sha256,
            "purl_file": None if purl is None else
            {"name": purl, "sha256": batch.purl_sha256},
            "error_file": errors,
            "received_at": _time(batch.created_at), "updated_at": _time(batch.updated_at),
            "instance": batch.instance,
        },
    }


@dataclass
class Entry:
    id: str
    path: Path
    data: dict[str, Any]  # event, type, client, project, url, body, attempts, next_at, ...

    @property
    def due(self) -> float:
        return float(self.data["next_at"])

    @property
    def order(self) -> tuple[float, int]:
        """Due first, then in the order the events were queued."""
        return self.due, int(self.data.get("queued_ns", 0))


def _read(path: Path) -> Entry | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("webhook entry %s unreadable (%s): left for an operator", path.name,
                    type(exc).__name__)
        return None
    return Entry(path.stem, path, data)


class Webhooks:
    """The queue (any thread, any process) and its delivery (the event loop)."""

    def __init__(self, root: Path, config: WebhookDeliveryConfig, *, region: str,
                 clients: Mapping[str, ClientConfig], alerts: OperatorAlerts | None = None,
                 clock: Callable[[], float] = time.time, poster: Poster | None = None) -> None:
        self.root, self.config, self.region = root, config, region
        self.clients = clients
        self.alerts = alerts
        self._clock = clock
        self._poster = poster
        self.queue, self.sent, self.failed, self.gone = (
            root / "queue", root / "sent", root / "failed", root / "gone")
        for folder in (self.queue, self.sent, self.failed, self.gone):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fresh: list[str] = []
        self._rescan = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.leases: Leases | None = None
        self.rescan_seconds = RESCAN_SECONDS

    @property
    def poster(self) -> Poster:
        """The HTTP client, made at the first delivery (a worker process only queues)."""
        if self._poster is None:
            from purlgate.channels.webhook_post import Poster  # noqa: PLC0415 - see above

            self._poster = Poster(self.config)
        return self._poster

    def share(self, leases: Leases) -> None:
        """Other instances deliver from the same folders."""
        self.leases = leases
        self.rescan_seconds = min(RESCAN_SECONDS, leases.seconds / 3)

    # -- queueing (a core subscriber: any thread or process) -------------------------

    def endpoints(self, client: str, project: str | None) -> list[WebhookConfig]:
        """The client's endpoints and its project's (one per URL)."""
        found = self.clients.get(client)
        if found is None:
            return []
        hooks = [*found.webhooks]
        if project is not None and project in found.projects:
            hooks += found.projects[project].webhooks
        return list({hook.url: hook for hook in hooks}.values())

    def _targets(self, event: BatchEvent) -> list[tuple[str, WebhookConfig, WebhookEvent]]:
        """(entry id, endpoint, type) of each entry ``event`` makes."""
        kind = event_type(event)
        wid = event_id(event.batch, kind)
        return [(_entry_id(wid, hook.url), hook, kind)
                for hook in self.endpoints(event.batch.client, event.batch.project)
                if kind in hook.events]

    def __call__(self, event: BatchEvent) -> None:
        """Queue ``event`` for each endpoint that asked for its type, durably."""
        batch = event.batch
        for entry_id, hook, kind in self._targets(event):
            if self._known(entry_id):
                continue  # published again (a restart): queued or delivered already
            now = self._clock()
            write_json(self.queue / f"{entry_id}.json", {
                "event": event_id(batch, kind), "type": kind, "client": batch.client,
                "project": batch.project, "url": hook.url,
                "body": json.dumps(body(kind, batch), separators=(",", ":")),
                "created_at": now, "next_at": now, "attempts": 0, "last_error": None,
                "queued_ns": time.time_ns()})
            log.info("webhook %s queued: %s of batch %d for %s", entry_id, kind, batch.id,
                     origin(hook.url))
            self.adopt([entry_id])

    def adopt_event(self, event: BatchEvent) -> None:
        """An event whose entries another process queued (a mail worker process)."""
        ids = [entry_id for entry_id, _hook, _kind in self._targets(event)]
        if ids:
            self.adopt(ids)

    def adopt(self, entry_ids: Sequence[str]) -> None:
        with self._lock:
            self._fresh.extend(entry_ids)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    def _known(self, entry_id: str) -> bool:
        return any((folder / f"{entry_id}.json").exists()
                   for folder in (self.queue, self.sent, self.failed))

    # -- the folders (operators, and the delivery's scans) -----------------------------

    def entries(self, folder: Path | None = None) -> list[Entry]:
        folder = folder or self.queue
        return [entry for path in sorted(folder.glob("*.json"))
                if (entry := _read(path)) is not None]

    def requeue(self, entry_id: str) -> None:
        """A dead-lettered entry tried again from scratch (its endpoint revived first if
        it had answered 410)."""
        entry = _read(self.failed / f"{entry_id}.json")
        if entry is None:
            raise KeyError(entry_id)
        now = self._clock()
        entry.data.update(attempts=0, next_at=now, created_at=now, last_error=None)
        entry.data.pop("why", None)
        write_json(self.queue / f"{entry_id}.json", entry.data)
        entry.path.unlink(missing_ok=True)

    def revive(self, url: str) -> bool:
        """Forget that ``url`` answered 410; True if it had."""
        marker = self._gone_marker(url)
        if not marker.exists():
            return False
        marker.unlink()
        return True

    def gone_endpoints(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in sorted(self.gone.glob("*.json"))]

    def _gone_marker(self, url: str) -> Path:
        return self.gone / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"

    def sweep_sent(self, max_age_seconds: float) -> int:
        """Delete delivery records older than ``max_age_seconds`` (by when they moved)."""
        cutoff = self._clock() - max_age_seconds
        removed = 0
        for path in self.sent.glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_ctime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    # -- delivery (the event loop) -----------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``, up to ``max_connections`` attempts at once; the
        attempts in flight finish."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        rounds = _Rounds(self)
        try:
            while not stop.is_set():
                self._wake.clear()
                next_due = await rounds.refresh()
                next_due = await rounds.start_due(stop, next_due)
                timeout = min(next_due if next_due is not None else RESCAN_SECONDS,
                              self.rescan_seconds)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await _first(self._wake, stop)
            await rounds.finish()
        finally:
            if self._poster is not None:
                await self._poster.close()

    async def deliver_due(self) -> None:
        """Try every due entry once, one after another (the tests' way in)."""
        for entry in sorted(await asyncio.to_thread(self.entries), key=lambda e: e.order):
            if entry.due <= self._clock():
                await self.attempt(entry)
        if self._poster is not None:
            await self._poster.close()

    async def attempt(self, entry: Entry) -> str:
        """One try: "sent", "deferred" or "failed" (recorded on disk)."""
        data = entry.data
        gone = await asyncio.to_thread(self._gone_since, data["url"])
        hook = next((h for h in self.endpoints(data["client"], data["project"])
                     if h.url == data["url"]), None)
        if gone is not None or hook is None:
            why = "gone" if gone is not None else "unconfigured"
            data["last_error"] = (f"the endpoint answered 410 Gone at {gone}" if gone else
                                  "the endpoint is no longer configured")
            await asyncio.to_thread(self._fail, entry, why)
            return "failed"
        data["attempts"] += 1
        from purlgate.channels.webhook_post import Answer, check_secret  # noqa: PLC0415

        try:  # a secret file is read off the event loop
            secret = await asyncio.to_thread(lambda: check_secret(hook.secret.reveal()))
        except ConfigError as exc:
            answer = Answer(None, exc.message)
        else:
            answer = await self.poster.post(data["url"], event_id=data["event"],
                                            body=data["body"].encode(), secret=secret)
        data["last_error"] = None if answer.delivered else answer.detail
        return await asyncio.to_thread(self._record, entry, answer)

    def _record(self, entry: Entry, answer: Answer) -> str:
        data, where = entry.data, origin(entry.data["url"])
        if answer.delivered:
            write_json(entry.path, data)  # the attempts, for the record
            entry.path.replace(self.sent / entry.path.name)
            fsync_dir(self.sent)
            log.info("webhook %s delivered to %s after %d attempt(s)", entry.id, where,
                     data["attempts"])
            return "sent"
        if answer.gone:
            self._mark_gone(data["url"])
            self._fail(entry, "gone")
            return "failed"
        if self._clock() - data["created_at"] >= self.config.expire_seconds:
            self._fail(entry, "expired")
            return "failed"
        delay = min(self.config.retry_first_seconds * 2 ** (data["attempts"] - 1),
                    self.config.retry_max_seconds)
        data["next_at"] = self._clock() + delay
        write_json(entry.path, data)
        log.warning("webhook %s to %s deferred (%s); retry in %.0f s", entry.id, where,
                    answer.detail, delay)
        return "deferred"

    def _gone_since(self, url: str) -> str | None:
        marker = self._gone_marker(url)
        try:
            return str(json.loads(marker.read_bytes())["at"])
        except (OSError, ValueError, KeyError):
            return None

    def _mark_gone(self, url: str) -> None:
        at = datetime.fromtimestamp(self._clock()).astimezone().isoformat(timespec="seconds")
        write_json(self._gone_marker(url), {"url": url, "at": at})
        log.warning("webhook endpoint %s answered 410 Gone: no more deliveries to it until "
                    "`purlgate webhooks --revive`", origin(url))

    def _fail(self, entry: Entry, why: str) -> None:
        """Dead-letter ``entry`` (``why``: expired, gone, unconfigured) and alert."""
        data = entry.data
        data["why"] = why
        write_json(self.failed / entry.path.name, data)
        entry.path.unlink(missing_ok=True)
        where = origin(data["url"])
        log.error("webhook %s to %s failed (%s) after %d attempt(s): %s", entry.id, where,
                  why, data["attempts"], data["last_error"])
        if self.alerts is not None and why != "unconfigured":
            self.alerts.send(
                f"webhook|{self.region}|{data['client']}|{where}|{why}",
                f"webhook to {where} {why} in region {self.region}",
                f"Region: {self.region}\nClient: {data['client']}\nEndpoint: {where}\n"
                f"Event: {data['type']} ({data['event']})\nAttempts: {data['attempts']}\n"
                f"Last error: {data['last_error']}\n\n"
                + ("The endpoint answered 410 Gone: nothing more is sent to it. When the "
                   "client has it back, run `purlgate webhooks --region "
                   f"{self.region} --revive URL`, then --requeue the entries to resend."
                   if why == "gone" else
                   "The event could not be delivered in time and was moved to "
                   f"{self.failed}. When the endpoint answers again, run `purlgate "
                   f"webhooks --region {self.region} --requeue {entry.id}` (or --requeue "
                   "all); `purlgate webhooks` lists them."))


async def _first(wake: asyncio.Event, stop: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class _Rounds:
    """The state of ``Webhooks.run``: the queue in memory, the attempts in flight."""

    def __init__(self, hooks: Webhooks) -> None:
        self.hooks = hooks
        self.slots = asyncio.Semaphore(hooks.config.max_connections)
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.index: dict[str, Entry] = {}
        self.scanned = float("-inf")

    async def refresh(self) -> float | None:
        hooks = self.hooks
        with hooks._lock:
            fresh, hooks._fresh = hooks._fresh, []
            rescan, hooks._rescan = hooks._rescan, False
        try:
            if rescan or time.monotonic() - self.scanned >= hooks.rescan_seconds:
                self.index = {e.id: e for e in await asyncio.to_thread(hooks.entries)}
                self.scanned = time.monotonic()
            for entry_id in fresh:
                entry = await asyncio.to_thread(_read, hooks.queue / f"{entry_id}.json")
                if entry is not None:
                    self.index[entry_id] = entry
        except (OSError, StorageError) as exc:
            _storage_fault(exc)
            with hooks._lock:
                hooks._rescan = True
            return STORAGE_RETRY_SECONDS
        return None

    async def start_due(self, stop: asyncio.Event, next_due: float | None) -> float | None:
        clock = self.hooks._clock
        for entry in sorted(self.index.values(), key=lambda e: e.order):
            if entry.id in self.in_flight or stop.is_set():
                continue
            if entry.due > clock():
                wait = entry.due - clock()
                return wait if next_due is None else min(next_due, wait)
            await self.slots.acquire()
            self.in_flight[entry.id] = asyncio.create_task(self._attempt(entry))
        return next_due

    async def _attempt(self, entry: Entry) -> None:
        hooks = self.hooks
        leased = False
        try:
            if hooks.leases is not None:
                taken = await asyncio.to_thread(self._take, entry)
                if taken is None:  # another instance's now, or done meanwhile
                    self.index.pop(entry.id, None)
                    return
                entry, leased = taken, True
            if await hooks.attempt(entry) == "deferred":
                self.index[entry.id] = entry
            else:
                self.index.pop(entry.id, None)
        except (OSError, StorageError) as exc:
            _storage_fault(exc)  # the entry stays as it is on disk, read again soon
            self.index.pop(entry.id, None)
            with hooks._lock:
                hooks._rescan = True
        finally:
            self.in_flight.pop(entry.id, None)
            self.slots.release()
            if leased:
                assert hooks.leases is not None
                with contextlib.suppress(OSError, StorageError):  # it runs out by itself
                    await asyncio.to_thread(hooks.leases.release, "webhook", entry.id)
            if hooks._wake is not None:
                hooks._wake.set()

    def _take(self, entry: Entry) -> Entry | None:
        leases = self.hooks.leases
        assert leases is not None
        if not leases.claim("webhook", entry.id):
            return None
        fresh = _read(entry.path)
        if fresh is None or fresh.due > self.hooks._clock():
            leases.release("webhook", entry.id)
            return None
        return fresh

    async def finish(self) -> None:
        if self.in_flight:
            await asyncio.gather(*self.in_flight.values(), return_exceptions=True)


def _storage_fault(exc: BaseException) -> None:
    log.warning("webhooks: storage fault (%s); trying again in %.0f s",
                getattr(exc, "message", None) or exc, STORAGE_RETRY_SECONDS)
