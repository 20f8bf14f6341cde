"""What operators see of a running region, and what it sweeps away.

Readiness checks, metric families and the batch view's error-file lookup, handed to
``web/ops.py`` as plain callables (so the web side imports no channel); the retention
sweep of results in Downloads and of sent mail. Wired by ``app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from purlgate.core.lifecycle import BatchRecord
from purlgate.web.ops import OpsAccess, OpsRoutes

if TYPE_CHECKING:
    from purlgate.app import Gateway

log = logging.getLogger("purlgate.operations")


def build_ops(gateway: Gateway) -> OpsRoutes:
    """Health, readiness, metrics and the batch view, on the links' web server."""
    region = gateway.region
    web_cfg = region.config.web
    assert web_cfg is not None and gateway.links is not None
    access = OpsAccess(
        networks=[ipaddress.ip_network(n, strict=False) for n in web_cfg.ops_networks],
        user=web_cfg.ops_user,
        password=(web_cfg.ops_password.reveal().decode() if web_cfg.ops_password else None))
    checks = {"listeners": lambda: _listeners_ready(gateway),
              "disk": lambda: _disk_ready(region.data_dir, region.config.smtp.min_free_bytes),
              "relay": lambda: _relay_ready(region.config.relay.host, region.config.relay.port)}
    return OpsRoutes(gateway.links.app, region=region.id, store=region.store, checks=checks,
                     families=lambda: _metric_families(gateway), access=access,
                     error_file=lambda batch: _error_file(gateway, batch))


def _error_file(gateway: Gateway, batch: BatchRecord) -> Path | None:
    """Where a batch's error file still is on our disk: SFTP results stay in Downloads
    (until retention); an email batch's went out in the reply."""
    name = next((n for n in batch.outputs if "_errors." in n), None)
    if name is None or batch.channel != "sftp" or gateway.sftp_service is None \
            or batch.project is None or batch.client not in gateway.sftp_service.clients:
        return None
    path = gateway.sftp_service.downloads(batch.client, batch.project) / name
    return path if path.is_file() else None


def _listeners_ready(gateway: Gateway) -> tuple[bool, str]:
    bound = {"smtp": gateway.smtp is not None and gateway.smtp.is_serving()}
    if gateway.sftp_service is not None:
        bound["sftp"] = gateway.sftp is not None
    down = [name for name, ok in bound.items() if not ok]
    return not down, "all bound" if not down else "not bound: " + ", ".join(down)


def _disk_ready(folder: Path, min_free: int) -> tuple[bool, str]:
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


def _relay_ready(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True, f"{host}:{port} answers"
    except OSError as exc:
        return False, f"{host}:{port}: {exc.strerror or exc}"


def _metric_families(gateway: Gateway) -> Iterable[Metric]:
    smtp = CounterMetricFamily("purlgate_smtp_messages", "SMTP messages by outcome",
                               labels=["outcome"])
    for outcome, count in sorted(gateway.handler.outcomes.items()):
        smtp.add_metric([outcome], count)
    yield smtp
    queued = gateway.outbox.items()
    oldest = min((item.meta["created_at"] for item in queued), default=None)
    yield GaugeMetricFamily("purlgate_outbox_depth", "Mail waiting for the relay",
                            value=len(queued))
    yield GaugeMetricFamily("purlgate_outbox_oldest_age_seconds",
                            "Age of the oldest mail waiting for the relay",
                            value=time.time() - oldest if oldest is not None else 0)
    yield GaugeMetricFamily("purlgate_outbox_failed",
                            "Mail refused by the relay or expired (outbox/failed)",
                            value=len(list(gateway.outbox.failed.glob("*.msg"))))
    yield GaugeMetricFamily("purlgate_spool_depth", "Accepted mail not answered yet",
                            value=len(gateway.spool.pending()))
    dead = GaugeMetricFamily("purlgate_dead_letters",
                             "Spooled mail and uploads moved to the dead-letter folder",
                             labels=["channel"])
    dead.add_metric(["mail"], len(gateway.spool.dead_entries()))
    busy = GaugeMetricFamily("purlgate_batches_running",
                             "Entries handed to a worker (being handled, or next in line "
                             "at a worker process)", labels=["channel"])
    busy.add_metric(["mail"], gateway.worker.queue.running)
    if gateway.sftp_service is not None and gateway.sftp_worker is not None:
        dead.add_metric(["sftp"], len(gateway.sftp_service.spool.dead_entries()))
        busy.add_metric(["sftp"], gateway.sftp_worker.queue.running)
    yield dead
    yield busy
    if gateway.sftp_service is not None:
        defender = gateway.sftp_service.defender
        logins = CounterMetricFamily("purlgate_sftp_logins", "SFTP logins by outcome",
                                     labels=["outcome"])
        for outcome, count in sorted(defender.events.items()):
            logins.add_metric([outcome], count)
        yield logins
        yield CounterMetricFamily("purlgate_sftp_bans", "Source addresses banned",
                                  value=defender.bans)
        yield GaugeMetricFamily("purlgate_sftp_uploads_waiting", "Uploads not processed yet",
                                value=len(gateway.sftp_service.spool.pending()))
    if gateway.links is not None:
        yield GaugeMetricFamily("purlgate_render_queue_depth",
                                "Thumbnails and videos being drawn or waiting",
                                value=gateway.links.pool.depth)


RETENTION_SWEEP_SECONDS = 3600.0


def sweep_files(gateway: Gateway) -> tuple[int, int]:
    """Results in SFTP Downloads past their project's retention, and sent mail past the
    longest retention of the region's projects (a reply does not say its project)."""
    clients = gateway.region.processor.clients
    days = max((p.retention_days for c in clients.values() for p in c.projects.values()),
               default=30)
    results = temp = 0
    if gateway.sftp_service is not None:
        results = gateway.sftp_service.sweep_downloads(time.time())
        temp = gateway.sftp_service.sweep_temp_uploads(time.time())
    mail = gateway.outbox.sweep_sent(days * 86400)
    if results or mail or temp:
        log.info("retention: deleted %d result file(s) from Downloads, %d abandoned "
                 "temporary upload(s) and %d sent mail(s)", results, temp, mail)
    return results, mail


async def run_retention(gateway: Gateway, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(sweep_files, gateway)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RETENTION_SWEEP_SECONDS)
