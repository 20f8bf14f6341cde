"""Alerts to the region's operator: real mail through the outbox. Every alert we send
is built here: dead letters, batches that failed on our side, undeliverable mail.

Dead letters (and the IMAP poller's troubles) are rate-limited: at most one alert an
hour for the same kind of trouble (the kind names the region, channel and error class,
never a client's data), so a poison message repeated 500 times is one mail, and the
alert says where the full list is. A failed batch and an undeliverable message are one
alert each (keyed by the batch or the message: a retry never sends it twice).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from purlgate.channels.replies import new_message, set_text
from purlgate.core.lifecycle import BatchRecord

if TYPE_CHECKING:
    from purlgate.channels.outbox import Outbox
    from purlgate.channels.outbox_files import Item

log = logging.getLogger("purlgate.alerts")

# Failures a client cannot fix and an operator must: each one alerts the operator.
OPERATOR_CODES: Mapping[str, str] = {
    "storage": "a storage fault stopped the batch (full disk, failed write): see the log "
               "and free space; the client was asked to send the file again",
    "server-error": "an error on our side stopped the batch: see the log; the client was "
                    "asked to send the file again",
    "pgp-encrypt": "the client's pinned PGP key cannot be encrypted to (expired or revoked): "
                   "get a renewed key from the client, update pgp_public_key and "
                   "pgp_fingerprint, restart, and ask for the file again (its name is free)",
    "render-auth": "the render API refused our credentials: check the region's "
                   "[storyboard] username and password, then ask the client to send the "
                   "file again",
}


def operator_alert(batch: BatchRecord, *, sender: str, to: str) -> EmailMessage:
    """What an operator must know to act; the batch's ids and counts, never row data."""
    message = new_message()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = (f"[purlgate] operator alert: {batch.error_code} in region "
                          f"{batch.region} (batch {batch.id})")
    set_text(
        message,
        f"Region: {batch.region}\nClient: {batch.client}\nProject: {batch.project or '-'}\n"
        f"Channel: {batch.channel}\nBatch: {batch.id}\nError: {batch.error_code}\n"
        f"File: {batch.data_name or batch.received_name}\n\n"
        f"What to do: {OPERATOR_CODES.get(batch.error_code or '', 'see the logs')}.\n"
    )
    return message


class OperatorAlerts:
    def __init__(self, outbox: Outbox, *, sender: str, operator: str | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.sender = sender
        self.operator = operator
        self._clock = clock

    def send(self, kind: str, subject: str, body: str) -> bool:
        """Queue an alert unless one of this kind was queued this hour. True when the
        operator has been alerted (now or earlier this hour); False without an operator.
        """
        if self.operator is None:
            log.error("no relay.operator to alert: %s", subject)
            return False
        message = new_message()
        message["From"] = self.sender
        message["To"] = self.operator
        message["Subject"] = f"[purlgate] operator alert: {subject[:120]}"
        set_text(message, f"{body}\n\nAlerts of this kind are sent at most once an hour.\n")
        hour = int(self._clock() // 3600)
        digest = hashlib.sha256(kind.encode()).hexdigest()[:12]
        self.outbox.enqueue(message, sender=self.sender, recipients=[self.operator],
                            key=f"alert-{digest}-{hour}", alert=False)
        return True

    def dead_letter(self, *, region: str, channel: str, client: str | None, error: str,
                    entry_id: str, attempts: int, what: str) -> bool:
        """The alert for an entry moved to the dead-letter folder (``what``: "message" or
        "upload"); one an hour per region, channel, client and error class."""
        return self.send(
            f"dead-letter|{region}|{channel}|{client}|{error}",
            f"{what} dead-lettered in region {region}",
            f"Region: {region}\nClient: {client or '-'}\nChannel: {channel}\n"
            f"Error: {error}\nSpool entry: {entry_id}\nAttempts: {attempts}\n\n"
            f"The {what} could not be processed and was moved to the dead-letter folder. "
            "Fix the cause (see the log for this spool entry), then run "
            f"`purlgate dead-letters --region {region} --requeue {entry_id}`; "
            "`purlgate dead-letters` lists every dead letter.")

    def batch_failed(self, batch: BatchRecord) -> None:
        """A batch that failed on our side (``OPERATOR_CODES``): one alert per batch."""
        if self.operator is None:
            return
        self.outbox.enqueue(operator_alert(batch, sender=self.sender, to=self.operator),
                            sender=self.sender, recipients=[self.operator],
                            key=f"alert-{batch.region}-{batch.id}")

    def undeliverable(self, item: Item, why: str, kept_in: Path) -> None:
        """A message the relay refused or that expired: one alert per message (none
        for an alert itself, which would only loop). An ``Outbox.on_failed`` hook."""
        item_id, meta = item.id, item.meta
        if not meta.get("alert") or self.operator is None:
            return
        note = new_message()
        note["From"] = meta["sender"]
        note["To"] = self.operator
        note["Subject"] = f"[purlgate] undeliverable message {item_id} ({why})"
        set_text(
            note,
            f"purlgate could not deliver outbox message {item_id}.\n"
            f"Recipients: {', '.join(meta['recipients'])}\n"
            f"Attempts: {meta['attempts']}\nLast error: {meta['last_error']}\n"
            f"The message is kept in {kept_in}.\n"
        )
        self.outbox.enqueue(note, sender=meta["sender"], recipients=[self.operator],
                            key=f"alert-{item_id}", alert=False)
