"""Alerts to the region's operator: real mail through the outbox, rate-limited.

At most one alert an hour for the same kind of trouble (the kind names the region,
channel and error class, never a client's data): a poison message repeated 500 times
is one mail, and the alert says where the full list is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from purlgate.channels.outbox import Outbox
from purlgate.channels.replies import new_message, set_text

log = logging.getLogger("purlgate.alerts")


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
