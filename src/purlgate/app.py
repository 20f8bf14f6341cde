"""Wiring: a running region, its channels and its web side around the batch core.

``region.py`` builds the core (store, renderers, row store, keys); this module adds the
SMTP listener, IMAP poller, SFTP server, their workers, the outbox and the web side,
and ``serve`` runs them in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.defender import Defender
from purlgate.channels.imap_poller import ImapPoller
from purlgate.channels.mail_process import MailProcesses
from purlgate.channels.mail_worker import MailLedger, MailWorker, Notifier
from purlgate.channels.outbox import Outbox, Sender, relay_sender
from purlgate.channels.sftp_server import (
    SftpService,
    SftpSpool,
    SftpWorker,
    close_sessions,
    load_or_create_host_key,
    start_sftp,
)
from purlgate.channels.smtp_listener import SmtpHandler, start_smtp
from purlgate.channels.spool import Spool
from purlgate.config import ClientConfig, Config
from purlgate.errors import ConfigError
from purlgate.operations import build_ops, run_retention
from purlgate.region import Region, build_region, utc_now
from purlgate.web.links import BatchIndex
from purlgate.web.ops import OpsRoutes
from purlgate.web.server import LinkServer, RenderPool, retention_of, start_web, tls_context
from purlgate.web.templates import Template, default_template_dir

log = logging.getLogger("purlgate.app")
T = TypeVar("T")


@dataclass
class Gateway:
    """A running region: the batch core plus the email channel around it."""

    region: Region
    spool: Spool
    outbox: Outbox
    worker: MailWorker
    handler: SmtpHandler
    imap: ImapPoller | None = None
    sftp_service: SftpService | None = None
    sftp_worker: SftpWorker | None = None
    host_key: asyncssh.SSHKey | None = None
    links: LinkServer | None = None
    ops: OpsRoutes | None = None
    smtp: asyncio.Server | None = None
    sftp: Any = None  # asyncssh's acceptor
    web_port: int = 0

    @property
    def sftp_port(self) -> int:
        assert self.sftp is not None
        return int(self.sftp.sockets[0].getsockname()[1])

    @property
    def smtp_port(self) -> int:
        assert self.smtp is not None
        return int(self.smtp.sockets[0].getsockname()[1])


def build_gateway(config: Config, region_id: str, *, data_dir: Path | None = None,
                  sender: Sender | None = None) -> Gateway:
    """Everything ``serve`` runs, built but not started (tests start pieces of it)."""
    region_cfg = config.regions[region_id]
    data_dir = data_dir or region_cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    clients = config.clients_of(region_id)
    outbox = Outbox(data_dir / "outbox", region_cfg.relay,
                    sender=sender or relay_sender(region_cfg.relay))
    notifier = Notifier(region=region_cfg, clients=clients, outbox=outbox)
    alerts = OperatorAlerts(outbox, sender=region_cfg.inbound_addresses[0],
                            operator=region_cfg.relay.operator)
    region = build_region(config, region_id, data_dir=data_dir, subscribers=[notifier])
    spool = Spool(data_dir / "spool", min_free_bytes=region_cfg.smtp.min_free_bytes)
    processes = (MailProcesses(config, region_id, data_dir, region_cfg.processing.workers)
                 if region_cfg.processing.mode == "processes" else None)
    worker = MailWorker(region=region_cfg, clients=clients, processor=region.processor,
                        spool=spool, outbox=outbox,
                        ledger=MailLedger(data_dir / "mail.sqlite3"),
                        work_root=data_dir / "mail-work", alerts=alerts, processes=processes)
    handler = SmtpHandler(inbound=set(region_cfg.inbound_addresses), clients=clients,
                          spool=spool, on_accepted=worker.submit)
    imap = None
    if region_cfg.imap is not None:
        imap = ImapPoller(region_cfg.imap, inbound=region_cfg.inbound_addresses,
                          clients=clients, spool=spool, on_accepted=worker.submit,
                          on_alert=lambda text: alerts.send(f"imap|{text}", text, text))
    gateway = Gateway(region, spool, outbox, worker, handler, imap)
    if region_cfg.sftp is not None:
        sftp_cfg = region_cfg.sftp
        service = SftpService(
            config=sftp_cfg, root=data_dir / "sftp", clients=clients, store=region.store,
            spool=SftpSpool(data_dir / "sftp-spool"), defender=Defender(sftp_cfg.defender),
        )
        sftp_worker = SftpWorker(service, region.processor,
                                 processing=region_cfg.processing, alerts=alerts)
        service.on_upload = sftp_worker.submit
        gateway.sftp_service, gateway.sftp_worker = service, sftp_worker
        gateway.host_key = load_or_create_host_key(
            sftp_cfg.host_key or data_dir / "ssh_host_ed25519_key")
    if region_cfg.web is not None:
        gateway.links = build_link_server(region, clients)
        gateway.ops = build_ops(gateway)
        for sink in (gateway.links.on_batch_event, gateway.ops.batch_metrics):
            region.processor.subscribers.append(sink)  # batches run here (SFTP, threads)
            worker.event_sinks.append(sink)  # batches run in mail worker processes
    else:
        log.warning("region %s has no [regions.%s.web] section: the links in its PURL "
                    "files will not answer", region_id, region_id)
    return gateway


def build_link_server(region: Region, clients: Mapping[str, ClientConfig]) -> LinkServer:
    """The web side of a region (its config must have a ``web`` section)."""
    web_cfg = region.config.web
    assert web_cfg is not None
    loaded: dict[Path, Template] = {}
    templates: dict[tuple[str, str], Template] = {}
    pregenerate: dict[tuple[str, str], tuple[str, ...]] = {}
    retention: dict[tuple[str, str], int] = {}
    for client_id, client in clients.items():
        for project_id, project in client.projects.items():
            retention[client_id, project_id] = project.retention_days
            if project.render.backend != "embedded":
                continue
            folder = (project.render.template or default_template_dir()).resolve()
            if folder not in loaded:
                loaded[folder] = Template(folder)
            templates[client_id, project_id] = loaded[folder]
            pregenerate[client_id, project_id] = tuple(project.render.pregenerate)
    index = BatchIndex(region.store, retention_of(retention), region.token_key, utc_now)
    return LinkServer(
        public_base_url=region.config.public_base_url, index=index, rows=region.rows,
        templates=templates, pregenerate=pregenerate,
        cache_dir=web_cfg.cache_dir or region.data_dir / "renders",
        pool=RenderPool(web_cfg.render_workers, web_cfg.render_queue), clock=utc_now,
    )


async def _listen(what: str, key: str, host: str, port: int,
                  starting: Awaitable[T]) -> T:
    """Start a listener; a port we cannot have is an operator's error naming its key."""
    try:
        return await starting
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen for {what} on {host}:{port} ({key}): {why}") from exc


def _resumed(gateway: Gateway) -> str:
    """What the last run left for this one: spooled mail and uploads, queued mail."""
    mail = len(gateway.spool.pending())
    uploads = (len(gateway.sftp_service.spool.pending())
               if gateway.sftp_service is not None else 0)
    queued = len(gateway.outbox.items())
    return (f"{mail} spooled message(s), {uploads} SFTP upload(s) to process, "
            f"{queued} queued mail(s)")


async def serve(gateway: Gateway, stop: asyncio.Event,
                on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Run the listeners, the workers, the outbox and the web side until ``stop`` is set.

    On stop the listeners close first (nothing new is accepted), the workers finish
    the entry in hand (the rest stays in the spools for the next start) and the outbox
    ends after its current attempt.
    """
    config = gateway.region.config
    rid = gateway.region.id
    runner = None
    imap_stop = threading.Event()
    try:
        gateway.smtp = await _listen("mail", f"regions.{rid}.smtp.port", config.smtp.host,
                                     config.smtp.port, start_smtp(gateway.handler, config.smtp))
        log.info("region %s: SMTP on %s:%d", rid, config.smtp.host, gateway.smtp_port)
        if gateway.sftp_service is not None and gateway.host_key is not None:
            sftp = gateway.sftp_service.config
            gateway.sftp = await _listen("SFTP", f"regions.{rid}.sftp.port", sftp.host,
                                         sftp.port,
                                         start_sftp(gateway.sftp_service, gateway.host_key))
            log.info("region %s: SFTP on %s:%d", rid, sftp.host, gateway.sftp_port)
        if gateway.links is not None and config.web is not None:
            web = config.web
            runner, gateway.web_port = await _listen(
                "the links", f"regions.{rid}.web.port", web.host, web.port,
                start_web(gateway.links, web,
                          tls_context(web, gateway.region.data_dir, config.public_base_url)))
            log.info("region %s: links served on %s:%d", rid, web.host, gateway.web_port)
        if gateway.imap is not None:  # a login or certificate to fix stops the start here
            await asyncio.to_thread(gateway.imap.check_login)
        log.info("region %s: resuming %s", rid, _resumed(gateway))
        gateway.worker.warm()
        if on_ready is not None:
            on_ready(gateway)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(gateway.worker.run(stop))
            tasks.create_task(gateway.outbox.run(stop))
            if gateway.imap is not None:
                tasks.create_task(asyncio.to_thread(gateway.imap.run, imap_stop))
            if gateway.sftp_worker is not None:
                tasks.create_task(gateway.sftp_worker.run(stop))
            if gateway.links is not None:
                tasks.create_task(gateway.links.run_sweeper(stop))
            tasks.create_task(run_retention(gateway, stop))
            await stop.wait()
            gateway.smtp.close()
            if gateway.sftp is not None:
                gateway.sftp.close()
            imap_stop.set()
    finally:
        imap_stop.set()
        if gateway.sftp is not None:
            gateway.sftp.close()
            await gateway.sftp.wait_closed()
        if gateway.sftp_service is not None:
            await close_sessions(gateway.sftp_service)
        if gateway.smtp is not None:
            gateway.smtp.close()
            await gateway.smtp.wait_closed()
        if runner is not None:
            await runner.cleanup()
        if gateway.links is not None:
            await gateway.links.close()
        await asyncio.to_thread(gateway.worker.close)
        gateway.region.close()
