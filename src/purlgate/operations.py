"""What operators see of a running region, and what it sweeps away.

Readiness checks and metric families are built here from the pieces they read (an
outbox, a spool, a queue, the SFTP service), each passed in by ``app.py``; the web side
gets them as plain callables (``web/ops.py`` imports no channel). ``RetentionSweep``
deletes results in Downloads and sent mail past their retention. ``LeaseKeeper`` keeps
this instance's leases and watches the region's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from purlgate.channels.outbox import Outbox
from purlgate.channels.queue_worker import QueueWorker
from purlgate.channels.sftp import SftpService
from purlgate.channels.spool import Spool
from purlgate.channels.webhooks import Webhooks
from purlgate.config import ClientConfig, WebConfig
from purlgate.core.leases import InstanceSeen
from purlgate.core.lifecycle import BatchRecord
from purlgate.region import Backend
from purlgate.web.ops import OpsAccess, ReadyCheck

log = logging.getLogger("purlgate.operations")

RETENTION_SWEEP_SECONDS = 3600.0


def ops_access(web: WebConfig) -> OpsAccess:
    return OpsAccess(
        networks=[ipaddress.ip_network(n, strict=False) for n in web.ops_networks],
        user=web.ops_user,
        password=web.ops_password.reveal().decode() if web.ops_password else None)


def listeners_check(bound: Callable[[], Mapping[str, bool]]) -> ReadyCheck:
    def check() -> tuple[bool, str]:
        down = [name for name, ok in bound().items() if not ok]
        return not down, "all bound" if not down else "not bound: " + ", ".join(down)
    return check


def disk_check(folder: Path, min_free: int) -> ReadyCheck:
    def check() -> tuple[bool, str]:
        try:
            probe = folder / ".ready-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            stat = os.statvfs(folder)
        except OSError as exc:
            return False, f"data directory not writable: {exc.strerror}"
        free = stat.f_bavail * stat.f_frsize
        if free < min_free:
            return False, f"{free} bytes free, below the floor of {min_free}"
        return True, f"{free} bytes free"
    return check


class RelayWatch:
    """Whether the relay answers, for /readyz (reported, never a 503: replies wait
    durably in the outbox) and the ``purlgate_relay_up`` gauge; the moment it stops
    answering is logged at ERROR (once, until it answers again) for the log's alerting."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.up: bool | None = None  # not looked at yet

    def __call__(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.host, self.port), timeout=3):
                ok, detail = True, f"{self.host}:{self.port} answers"
        except OSError as exc:
            ok, detail = False, f"{self.host}:{self.port}: {exc.strerror or exc}"
        if ok != self.up:
            if ok:
                log.info("the relay answers again (%s)", detail)
            else:
                log.error("the relay does not answer (%s); replies and notifications wait "
                          "in the outbox", detail)
        self.up = ok
        return ok, detail

    def families(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("purlgate_relay_up",
                                "1 if the relay answered when last asked, 0 if not",
                                value=1 if self()[0] else 0)


def downloads_error_file(service: SftpService) -> Callable[[BatchRecord], Path | None]:
    """Where a batch's error file still is on our disk: SFTP results stay in Downloads
    (until retention); an email batch's went out in the reply."""
    def find(batch: BatchRecord) -> Path | None:
        name = next((n for n in batch.outputs if "_errors." in n), None)
        if name is None or batch.channel != "sftp" or batch.project is None \
                or batch.client not in service.clients:
            return None
        path = service.downloads(batch.client, batch.project) / name
        return path if path.is_file() else None
    return find


def mail_families(outcomes: Mapping[str, int], outbox: Outbox,
                  spool: Spool) -> Iterable[Metric]:
    smtp = CounterMetricFamily("purlgate_smtp_messages", "SMTP messages by outcome",
                               labels=["outcome"])
    for outcome, count in sorted(outcomes.items()):
        smtp.add_metric([outcome], count)
    yield smtp
    yield from _queue_families(
        "purlgate_outbox", "mail waiting for the relay",
        [item.meta["created_at"] for item in outbox.items()],
        "Mail refused by the relay or expired (outbox/failed)",
        len(list(outbox.failed.glob("*.msg"))))
    yield GaugeMetricFamily("purlgate_spool_depth", "Accepted mail not answered yet",
                            value=len(spool.pending()))


def sftp_families(service: SftpService) -> Iterable[Metric]:
    logins = CounterMetricFamily("purlgate_sftp_logins", "SFTP logins by outcome",
                                 labels=["outcome"])
    for outcome, count in sorted(service.defender.events.items()):
        logins.add_metric([outcome], count)
    yield logins
    yield CounterMetricFamily("purlgate_sftp_bans", "Source addresses banned",
                              value=service.defender.bans)
    yield GaugeMetricFamily("purlgate_sftp_uploads_waiting", "Uploads not processed yet",
                            value=len(service.spool.pending()))


def webhook_families(webhooks: Webhooks) -> Iterable[Metric]:
    yield from _queue_families(
        "purlgate_webhooks", "webhook events not delivered yet",
        [e.data["created_at"] for e in webhooks.entries()],
        "Webhook events dead-lettered (webhooks/failed)",
        len(list(webhooks.failed.glob("*.json"))))


def _queue_families(prefix: str, what: str, created: list[float], failed_help: str,
                    failed: int) -> Iterable[Metric]:
    """A durable queue's depth, the age of its oldest entry, and its dead letters."""
    yield GaugeMetricFamily(f"{prefix}_depth", what.capitalize(), value=len(created))
    yield GaugeMetricFamily(f"{prefix}_oldest_age_seconds", f"Age of the oldest of the {what}",
                            value=time.time() - min(created) if created else 0)
    yield GaugeMetricFamily(f"{prefix}_failed", failed_help, value=failed)


def render_families(depth: Callable[[], int]) -> Iterable[Metric]:
    yield GaugeMetricFamily("purlgate_render_queue_depth",
                            "Thumbnails and videos being drawn or waiting", value=depth())


def channel_families(channels: Mapping[str, tuple[Callable[[], int], QueueWorker[Any]]]
                     ) -> Iterable[Metric]:
    """Per channel ("mail", "sftp"): its dead letters (counted by the callable) and the
    entries its queue has handed to a worker."""
    dead = GaugeMetricFamily("purlgate_dead_letters",
                             "Spooled mail and uploads moved to the dead-letter folder",
                             labels=["channel"])
    busy = GaugeMetricFamily("purlgate_batches_running",
                             "Entries handed to a worker (being handled, or next in line "
                             "at a worker process)", labels=["channel"])
    for channel, (dead_letters, queue) in channels.items():
        dead.add_metric([channel], dead_letters())
        busy.add_metric([channel], queue.running)
    yield dead
    yield busy


class RetentionSweep:
    """Results in SFTP Downloads past their project's retention, abandoned temporary
    uploads, and sent mail and webhook delivery records past the longest retention of
    the region's projects (a reply does not say its project). Counts only in the log."""

    def __init__(self, *, clients: Mapping[str, ClientConfig], outbox: Outbox,
                 sftp: SftpService | None, webhooks: Webhooks | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.webhooks = webhooks
        self.sftp = sftp
        self.clock = clock
        self.days = max((p.retention_days for c in clients.values()
                         for p in c.projects.values()), default=30)

    def sweep(self) -> tuple[int, int]:
        """Delete what is past retention; (result files, sent mails) deleted."""
        results = temp = 0
        if self.sftp is not None:
            results = self.sftp.sweep_downloads(self.clock())
            temp = self.sftp.sweep_temp_uploads(self.clock())
        mail = self.outbox.sweep_sent(self.days * 86400)
        if self.webhooks is not None:
            self.webhooks.sweep_sent(self.days * 86400)
        if results or mail or temp:
            log.info("retention: deleted %d result file(s) from Downloads, %d abandoned "
                     "temporary upload(s) and %d sent mail(s)", results, temp, mail)
        return results, mail

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sweep)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETENTION_SWEEP_SECONDS)


class LeaseKeeper:
    """This instance's life line to the others: renews all of its leases every third of
    their time (which also says it is alive), and watches the database. While the
    database cannot be reached, ``down`` is true: intake answers "try again later"
    (SMTP 451, an SFTP failure), /readyz answers 503, and it is tried again every
    couple of seconds; the leases ran out meanwhile only if it stayed away for longer
    than their time (then another instance may take the work over, which every step
    allows). Also keeps, for /metrics, how the region's instances were last seen."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.down = False
        self.detail = "reachable"
        self.seen: list[InstanceSeen] = []
        self._joined = False

    def _renew(self) -> list[InstanceSeen]:
        if not self._joined:  # at the first renewal that reaches the database
            self.backend.leases.join()
            self._joined = True
        self.backend.leases.renew()
        return self.backend.leases.instances()

    async def run(self, stop: asyncio.Event) -> None:
        every = self.backend.leases.seconds / 3
        while not stop.is_set():
            try:
                self.seen = await asyncio.to_thread(self._renew)
            except Exception as exc:  # noqa: BLE001 - the database away: said and retried
                detail = getattr(exc, "message", None) or type(exc).__name__
                if not self.down:
                    log.error("%s: intake answers 'try again later' until it is back",  # noqa: TRY400 - expected, no trace
                              detail)
                self.down, self.detail = True, detail
            else:
                if self.down:
                    log.warning("the database is reachable again: intake resumes")
                self.down, self.detail = False, "reachable"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(every, 2.0) if self.down else every)

    async def leave(self) -> None:
        """A clean stop, once the work in hand is finished: what this instance held is
        free for the others at once."""
        try:
            await asyncio.to_thread(self.backend.leases.leave)
        except Exception as exc:  # noqa: BLE001 - then they run out by themselves
            log.warning("could not give the leases back (%s); they run out in %.0f s",
                        getattr(exc, "message", None) or exc, self.backend.leases.seconds)

    def check(self) -> tuple[bool, str]:
        return not self.down, self.detail

    def families(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("purlgate_database_up",
                                "Whether this instance reaches the region's database",
                                value=0 if self.down else 1)
        leases = GaugeMetricFamily("purlgate_instance_leases",
                                   "Live leases (work in hand) of each instance of the region",
                                   labels=["instance"])
        seen = GaugeMetricFamily("purlgate_instance_seen_seconds",
                                 "Seconds since each instance last renewed its leases",
                                 labels=["instance"])
        for instance in self.seen:
            leases.add_metric([instance.name], instance.leases)
            seen.add_metric([instance.name], instance.seen_ago)
        yield leases
        yield seen
