"""Batch lifecycle events as mail: notifications to the client's and the project's
addresses, and the failures only an operator can fix to the operator (alerts.py)."""

from __future__ import annotations

from collections.abc import Mapping

from purlgate.channels.alerts import OPERATOR_CODES, OperatorAlerts
from purlgate.channels.outbox import Outbox
from purlgate.channels.replies import SUBJECTS, notification
from purlgate.config import ClientConfig, RegionConfig
from purlgate.core.lifecycle import BatchEvent, EventKind


class Notifier:
    """A core subscriber: each event of a batch, mailed once (keyed by batch and kind)."""

    def __init__(self, *, region: RegionConfig, clients: Mapping[str, ClientConfig],
                 outbox: Outbox, alerts: OperatorAlerts) -> None:
        self.sender = region.inbound_addresses[0]
        self.clients = clients
        self.outbox = outbox
        self.alerts = alerts

    def __call__(self, event: BatchEvent) -> None:
        batch = event.batch
        if event.kind is EventKind.FAILED and batch.error_code in OPERATOR_CODES:
            self.alerts.batch_failed(batch)
        client = self.clients.get(batch.client)
        if client is None or event.kind not in SUBJECTS:
            return  # the guide's three notifications only (not received, validations)
        project = client.projects.get(batch.project or "")
        to = list(dict.fromkeys([*(project.notify if project else []), *client.notify]))
        if not to:
            return
        self.outbox.enqueue(notification(event, sender=self.sender, to=to),
                            sender=self.sender, recipients=to,
                            key=f"notify-{batch.region}-{batch.id}-{event.kind.value}")
