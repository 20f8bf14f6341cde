"""The email side of a region, wired once: the region's core, the outbox and what queues
into it (notifier, operator alerts), the webhooks' queue, the spool and the mail worker.

``serve`` builds it with the relay as the outbox's sender; each mail worker process
builds it again from the same picklable ``MailSideFactory``, queueing only (the gateway
delivers). It imports only the mail path, so a worker process loads no listener, no
SFTP server and no web side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.mail_worker import Elsewhere, MailLedger, MailWorker
from purlgate.channels.notifier import Notifier
from purlgate.channels.outbox import Outbox
from purlgate.channels.relay import RelayLimit, Sender
from purlgate.channels.relay_data import Outgoing
from purlgate.channels.sender_checks import LazyChecks
from purlgate.channels.spool import Spool
from purlgate.channels.too_big import TooBigForMail
from purlgate.channels.webhooks import Webhooks
from purlgate.config import Config, RelayConfig
from purlgate.core.pipeline import Subscriber
from purlgate.downloads import Downloads
from purlgate.region import Region, build_region


def relay_limit(relay: RelayConfig, data_dir: Path) -> RelayLimit:
    """What the relay takes: its SIZE as the gateway learned it, or the configured limit."""
    return RelayLimit(data_dir / "outbox" / "relay.json", relay.max_message_bytes)


@dataclass
class MailSide:
    region: Region
    outbox: Outbox
    alerts: OperatorAlerts
    spool: Spool
    worker: MailWorker
    webhooks: Webhooks
    checks: LazyChecks
    limit: RelayLimit  # what the relay takes (the gateway's relay connections learn it)


async def _never_sends(message: Outgoing, sender: str, recipients: Sequence[str]) -> None:
    raise AssertionError("this outbox only queues; the gateway delivers")


@dataclass(frozen=True)
class MailSideFactory:
    """Builds a region's email side; picklable, so a worker process gets one."""

    config: Config
    region_id: str
    data_dir: Path

    def build(self, *, sender: Sender | None, subscribers: Sequence[Subscriber] = (),
              processes: Elsewhere | None = None, owner: bool = True) -> MailSide:
        """``sender``: the relay (None: an outbox that only queues). ``owner``: this
        process owns the spool's temporary files (the gateway; not a worker process)."""
        region_cfg = self.config.region(self.region_id)
        clients = self.config.clients_of(self.region_id)
        outbox = Outbox(self.data_dir / "outbox", region_cfg.relay,
                        sender=sender or _never_sends)
        limit = relay_limit(region_cfg.relay, self.data_dir)
        outbox.limit = limit.current
        alerts = OperatorAlerts(outbox, sender=region_cfg.inbound_addresses[0],
                                operator=region_cfg.relay.operator)
        outbox.on_failed = alerts.undeliverable
        notifier = Notifier(region=region_cfg, clients=clients, outbox=outbox, alerts=alerts)
        # Queued by whichever process runs the batch; the gateway delivers.
        webhooks = Webhooks(self.data_dir / "webhooks", region_cfg.webhooks,
                            region=self.region_id, clients=clients, alerts=alerts)
        region = build_region(self.config, self.region_id, data_dir=self.data_dir,
                              subscribers=[notifier, webhooks, *subscribers])
        backend = region.backend
        checks = LazyChecks(region_cfg.sender_auth, region_cfg.dns,
                            hostname=region_cfg.smtp.hostname)
        spool = Spool(self.data_dir / "spool", min_free_bytes=region_cfg.smtp.min_free_bytes,
                      owner=owner, tmp=backend.scratch(self.data_dir / "spool" / "tmp"))
        worker = MailWorker(region=region_cfg, clients=clients, processor=region.processor,
                            spool=spool, outbox=outbox,
                            ledger=backend.mail_ledger or MailLedger(
                                self.data_dir / "mail.sqlite3"),
                            work_root=backend.scratch(self.data_dir / "mail-work"),
                            alerts=alerts, processes=processes, checks=checks,
                            too_big=TooBigForMail(
                                limit=limit,
                                downloads=Downloads(self.data_dir / "downloads"),
                                base_url=region_cfg.public_base_url if region_cfg.web else None,
                                hours=region_cfg.web.download_hours if region_cfg.web else 0,
                                alerts=alerts, region=self.region_id))
        if backend.shared:
            worker.queue.share(backend.leases, lambda entry: entry.path.exists())
            outbox.share(backend.leases)
            webhooks.share(backend.leases)
        return MailSide(region, outbox, alerts, spool, worker, webhooks, checks, limit)

    def __call__(self, on_event: Subscriber) -> MailWorker:
        """The mail worker of a worker process: it queues only, leaves the spool's
        temporary files to the gateway, and hands each batch event to ``on_event``."""
        return self.build(sender=None, subscribers=[on_event], owner=False).worker
