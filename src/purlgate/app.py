"""Wiring: a running region, its channels and its web side around the batch core.

``region.py`` builds the core (store, renderers, row store, keys) and ``mail_side.py``
the email side around it (outbox, alerts, notifier, spool, mail worker: the same
factory builds it in the mail worker processes). This module adds the listeners (SMTP,
IMAP, SFTP), the SFTP worker, the web side and the operations, each built once here,
and ``serve`` runs them in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
from aiohttp import web

from purlgate.channels.defender import Defender
from purlgate.channels.imap_poller import ImapPoller
from purlgate.channels.mail_process import MailProcesses
from purlgate.channels.mail_worker import MailWorker
from purlgate.channels.outbox import Outbox
from purlgate.channels.queue_worker import QueueWorker
from purlgate.channels.relay import RelayConnections, Sender, relay_sender
from purlgate.channels.sftp import (
    SftpService,
    SftpSpool,
    SftpWorker,
    close_sessions,
    load_or_create_host_key,
    start_sftp,
)
from purlgate.channels.smtp_listener import SmtpHandler, start_smtp
from purlgate.channels.spool import Spool
from purlgate.channels.webhooks import Webhooks
from purlgate.config import ClientConfig, Config
from purlgate.downloads import Downloads
from purlgate.errors import ConfigError
from purlgate.mail_side import MailSide, MailSideFactory
from purlgate.operations import (
    LeaseKeeper,
    RelayWatch,
    RetentionSweep,
    channel_families,
    disk_check,
    downloads_error_file,
    listeners_check,
    mail_families,
    ops_access,
    render_families,
    sftp_families,
    webhook_families,
)
from purlgate.region import Region, utc_now
from purlgate.renderers.columns import default_template_dir
from purlgate.web.links import BatchIndex
from purlgate.web.ops import OpsRoutes, ReadyCheck
from purlgate.web.render_pool import RenderPool
from purlgate.web.server import LinkServer, retention_of, start_web
from purlgate.web.templates import Template
from purlgate.web.tls import tls_context

log = logging.getLogger("purlgate.app")
T = TypeVar("T")


@dataclass
class Gateway:
    """A running region: the batch core, its channels, its web side."""

    region: Region
    spool: Spool
    outbox: Outbox
    worker: MailWorker
    handler: SmtpHandler
    retention: RetentionSweep
    keeper: LeaseKeeper
    webhooks: Webhooks
    relay: RelayConnections | None = None  # made here, so closed here
    imap: ImapPoller | None = None
    sftp_service: SftpService | None = None
    sftp_worker: SftpWorker | None = None
    host_key: asyncssh.SSHKey | None = None
    links: LinkServer | None = None
    ops: OpsRoutes | None = None
    smtp: asyncio.Server | None = None
    sftp: Any = None  # asyncssh's acceptor
    web_runner: web.AppRunner | None = None
    web_port: int = 0

    @property
    def sftp_port(self) -> int:
        assert self.sftp is not None
        return int(self.sftp.sockets[0].getsockname()[1])

    @property
    def smtp_port(self) -> int:
        assert self.smtp is not None
        return int(self.smtp.sockets[0].getsockname()[1])

    def bound(self) -> dict[str, bool]:
        """Each listener this region runs, and whether it is bound."""
        bound = {"smtp": self.smtp is not None and self.smtp.is_serving()}
        if self.sftp_service is not None:
            bound["sftp"] = self.sftp is not None
        return bound


def build_gateway(config: Config, region_id: str, *, data_dir: Path | None = None,
                  sender: Sender | None = None) -> Gateway:
    """Everything ``serve`` runs, built but not started (tests start pieces of it).
    ``sender``: deliver mail through this instead of the configured relay."""
    region_cfg = config.region(region_id)
    data_dir = data_dir or region_cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    relay = None
    if sender is None:
        sender = relay = relay_sender(region_cfg.relay)
    factory = MailSideFactory(config, region_id, data_dir)
    processes = (MailProcesses(factory, region_cfg.processing.workers,
                               recycle_mb=region_cfg.processing.recycle_mb)
                 if region_cfg.processing.mode == "processes" else None)
    mail = factory.build(sender=sender, processes=processes)
    if relay is not None:  # its SIZE, for the outbox and the replies too big for mail
        relay.on_size = mail.limit.learn
    clients = config.clients_of(region_id)
    handler = SmtpHandler(inbound=set(region_cfg.inbound_addresses), clients=clients,
                          spool=mail.spool, on_accepted=mail.worker.submit,
                          checks=mail.checks)
    keeper = LeaseKeeper(mail.region.backend)
    handler.paused = lambda: keeper.down
    gateway = Gateway(mail.region, mail.spool, mail.outbox, mail.worker, handler,
                      RetentionSweep(clients=clients, outbox=mail.outbox, sftp=None,
                                     webhooks=mail.webhooks), keeper, mail.webhooks,
                      relay=relay, imap=_imap(mail, clients))
    # Events of batches run in mail worker processes: their webhooks were queued there.
    mail.worker.event_sinks.append(mail.webhooks.adopt_event)
    if region_cfg.sftp is not None:
        _add_sftp(gateway, mail, clients)
    if region_cfg.web is not None:
        gateway.links = build_link_server(mail.region, clients)
        gateway.ops = _build_ops(gateway)
        for sink in (gateway.links.on_batch_event, gateway.ops.batch_metrics):
            mail.region.processor.subscribers.append(sink)  # batches run here (SFTP, threads)
            mail.worker.event_sinks.append(sink)  # batches run in mail worker processes
    else:
        log.warning("region %s has no [regions.%s.web] section: the links in its PURL "
                    "files will not answer", region_id, region_id)
    return gateway


def _imap(mail: MailSide, clients: Mapping[str, ClientConfig]) -> ImapPoller | None:
    config = mail.region.config
    if config.imap is None:
        return None
    alerts = mail.alerts
    return ImapPoller(config.imap, inbound=config.inbound_addresses, clients=clients,
                      spool=mail.spool, on_accepted=mail.worker.submit,
                      on_alert=lambda text: alerts.send(f"imap|{text}", text, text))


def _add_sftp(gateway: Gateway, mail: MailSide, clients: Mapping[str, ClientConfig]) -> None:
    region = mail.region
    sftp_cfg = region.config.sftp
    assert sftp_cfg is not None
    backend = region.backend
    spool = SftpSpool(region.data_dir / "sftp-spool",
                      tmp=backend.scratch(region.data_dir / "sftp-spool" / "tmp"))
    service = SftpService(
        config=sftp_cfg, root=region.data_dir / "sftp", clients=clients, store=region.store,
        spool=spool, defender=Defender(sftp_cfg.defender),
    )
    worker = SftpWorker(service, region.processor, processing=region.config.processing,
                        alerts=mail.alerts)
    if backend.shared:
        service.share(backend.leases)
        worker.queue.share(backend.leases, lambda upload: (spool.incoming / upload.id).exists())
    service.on_upload = worker.submit
    service.on_refused = worker.note_refusal
    gateway.sftp_service, gateway.sftp_worker = service, worker
    gateway.retention.sftp = service
    gateway.host_key = load_or_create_host_key(
        sftp_cfg.host_key or region.data_dir / "ssh_host_ed25519_key")


def _build_ops(gateway: Gateway) -> OpsRoutes:
    """Health, readiness, metrics and the batch view, on the links' web server."""
    region, links, service = gateway.region, gateway.links, gateway.sftp_service
    web_cfg = region.config.web
    assert web_cfg is not None and links is not None
    relay = RelayWatch(region.config.relay.host, region.config.relay.port)
    checks: dict[str, ReadyCheck] = {
        "listeners": listeners_check(gateway.bound),
        "disk": disk_check(region.data_dir, region.config.smtp.min_free_bytes),
        "relay": relay}
    shared = region.backend.shared
    if shared:
        checks["database"] = gateway.keeper.check
    channels: dict[str, tuple[Callable[[], int], QueueWorker[Any]]] = {
        "mail": (lambda: len(gateway.spool.dead_entries()), gateway.worker.queue)}
    if service is not None and gateway.sftp_worker is not None:
        channels["sftp"] = (lambda: len(service.spool.dead_entries()),
                            gateway.sftp_worker.queue)

    def families() -> list[Any]:
        found = [*mail_families(gateway.handler.outcomes, gateway.outbox, gateway.spool),
                 *channel_families(channels), *render_families(lambda: links.pool.depth),
                 *relay.families(), *webhook_families(gateway.webhooks),
                 *(gateway.keeper.families() if shared else ())]
        return found + (list(sftp_families(service)) if service is not None else [])

    ops = OpsRoutes(links.app, region=region.id, store=region.store, checks=checks,
                     families=families, access=ops_access(web_cfg),
                     advisory=frozenset({"relay"}),
                     leases=region.backend.leases if shared else None,
                     error_file=(downloads_error_file(service) if service is not None
                                 else lambda batch: None))
    ops.downloads = downloads_of(links, region.config.public_base_url)
    return ops


def downloads_of(links: LinkServer, base_url: str
                 ) -> Callable[[], dict[int, dict[str, str]]]:
    """The replies too big for mail, by batch, as the batch view shows them."""
    def found() -> dict[int, dict[str, str]]:
        kept = links.downloads.by_batch() if links.downloads is not None else {}
        return {batch_id: {"url": f"{base_url}/d/{d.token}", "until": datetime.fromtimestamp(
                    d.expires_at, UTC).isoformat(timespec="seconds")}
                for batch_id, d in kept.items()}
    return found


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
        pool=RenderPool(web_cfg.render_workers, web_cfg.render_queue,
                        web_cfg.render_timeout_seconds, web_cfg.render_idle_seconds),
        clock=utc_now,
        downloads=Downloads(region.data_dir / "downloads"),
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
    hooks = len(gateway.webhooks.entries())
    return (f"{mail} spooled message(s), {uploads} SFTP upload(s) to process, "
            f"{queued} queued mail(s), {hooks} queued webhook(s)")


async def _start_listeners(gateway: Gateway) -> None:
    """Bind SMTP, SFTP and the web side (a port we cannot have stops the start here),
    then check the IMAP login."""
    config, rid = gateway.region.config, gateway.region.id
    gateway.smtp = await _listen("mail", f"regions.{rid}.smtp.port", config.smtp.host,
                                 config.smtp.port, start_smtp(gateway.handler, config.smtp))
    log.info("region %s: SMTP on %s:%d", rid, config.smtp.host, gateway.smtp_port)
    if gateway.sftp_service is not None and gateway.host_key is not None:
        sftp = gateway.sftp_service.config
        gateway.sftp = await _listen("SFTP", f"regions.{rid}.sftp.port", sftp.host, sftp.port,
                                     start_sftp(gateway.sftp_service, gateway.host_key))
        log.info("region %s: SFTP on %s:%d", rid, sftp.host, gateway.sftp_port)
    if gateway.links is not None and config.web is not None:
        web_cfg = config.web
        gateway.web_runner, gateway.web_port = await _listen(
            "the links", f"regions.{rid}.web.port", web_cfg.host, web_cfg.port,
            start_web(gateway.links, web_cfg,
                      tls_context(web_cfg, gateway.region.data_dir, config.public_base_url)))
        log.info("region %s: links served on %s:%d", rid, web_cfg.host, gateway.web_port)
    if gateway.imap is not None:  # a login or certificate to fix stops the start here
        await asyncio.to_thread(gateway.imap.check_login)


async def _run(gateway: Gateway, stop: asyncio.Event, imap_stop: threading.Event) -> None:
    """The workers, the outbox, the IMAP poller and the sweeps, until ``stop``; then the
    listeners close first (nothing new is accepted) and the rest finish."""
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(gateway.worker.run(stop))
        tasks.create_task(gateway.outbox.run(stop))
        tasks.create_task(gateway.webhooks.run(stop))
        if gateway.relay is not None:  # its SIZE, before a reply is weighed against it
            tasks.create_task(gateway.relay.probe())
        if gateway.imap is not None:
            tasks.create_task(asyncio.to_thread(gateway.imap.run, imap_stop))
        if gateway.sftp_worker is not None:
            tasks.create_task(gateway.sftp_worker.run(stop))
        if gateway.links is not None:
            tasks.create_task(gateway.links.run_sweeper(stop))
        tasks.create_task(gateway.retention.run(stop))
        # Row data the previous release kept in plaintext is sealed, in the background.
        tasks.create_task(asyncio.to_thread(gateway.region.rows.encrypt_legacy, stop.is_set))
        if gateway.region.backend.shared:
            tasks.create_task(gateway.keeper.run(stop))
        await stop.wait()
        if gateway.smtp is not None:
            gateway.smtp.close()
        if gateway.sftp is not None:
            gateway.sftp.close()
        imap_stop.set()


async def _shut_down(gateway: Gateway, imap_stop: threading.Event) -> None:
    imap_stop.set()
    if gateway.sftp is not None:
        gateway.sftp.close()
        await gateway.sftp.wait_closed()
    if gateway.sftp_service is not None:
        await close_sessions(gateway.sftp_service)
    if gateway.smtp is not None:
        gateway.smtp.close()
        await gateway.smtp.wait_closed()
    if gateway.web_runner is not None:
        await gateway.web_runner.cleanup()
    if gateway.links is not None:
        await gateway.links.close()
    if gateway.relay is not None:
        await gateway.relay.close()  # QUIT the kept relay connections
    await asyncio.to_thread(gateway.worker.close)
    if gateway.region.backend.shared:
        await gateway.keeper.leave()
    gateway.region.close()


async def serve(gateway: Gateway, stop: asyncio.Event,
                on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Run the listeners, the workers, the outbox and the web side until ``stop`` is set.

    On stop the listeners close first (nothing new is accepted), the workers finish
    the entry in hand (the rest stays in the spools for the next start) and the outbox
    ends after its current attempt.
    """
    imap_stop = threading.Event()
    try:
        await _start_listeners(gateway)
        log.info("region %s: resuming %s", gateway.region.id, _resumed(gateway))
        gateway.worker.warm()
        if on_ready is not None:
            on_ready(gateway)
        await _run(gateway, stop, imap_stop)
    finally:
        await _shut_down(gateway, imap_stop)
