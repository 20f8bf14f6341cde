"""Replies too big for mail: never handed to the relay, downloaded instead.

Before a reply's ZIP is attached, its size in the mail (base64, line breaks, headers) is
weighed against what the relay takes (``relay.RelayLimit``: its SIZE, or
``relay.max_message_bytes``). One that would not fit is moved to the download store
(``downloads.py``) and the reply says where to get it: a link for that file only, on the
region's web side, until ``web.download_hours`` from now. Without a web side there is no
link to give: the file is kept all the same, the operator is alerted with where it is,
and the reply says so.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.relay import RelayLimit
from purlgate.channels.replies import Stash
from purlgate.downloads import Downloads

log = logging.getLogger("purlgate.mail")

HEADROOM = 16 * 1024  # the reply's headers and text around the attachment


def mail_size(size: int) -> int:
    """What ``size`` bytes weigh in a message: base64 in 76-character lines, and room
    for the rest of the reply."""
    encoded = 4 * -(-size // 3)
    return encoded + 2 * -(-encoded // 76) + HEADROOM


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


class TooBigForMail:
    def __init__(self, *, limit: RelayLimit, downloads: Downloads, base_url: str | None,
                 hours: float, alerts: OperatorAlerts | None, region: str) -> None:
        self.limit = limit
        self.downloads = downloads
        self.base_url = base_url  # the web side's public_base_url; None: no web side
        self.hours = hours
        self.alerts = alerts
        self.region = region

    def stash(self, batch_id: int, client: str) -> Stash:
        """The ``replies.Stash`` of a batch's reply."""
        def offered(path: Path, name: str) -> str | None:
            limit = self.limit.current()
            weight = mail_size(path.stat().st_size)
            if limit is None or weight <= limit:
                return None
            kept = self.downloads.keep(path, name=name, batch_id=batch_id, client=client,
                                       hours=self.hours)
            too_big = (f"It is too big for mail ({_mb(weight)}; the mail relay takes at most "
                       f"{_mb(limit)}), so it is not attached:")
            log.info("batch %d: its reply's ZIP (%s) is too big for the relay (%s): kept "
                     "for download", batch_id, _mb(weight), _mb(limit))
            if self.base_url is not None:
                until = datetime.fromtimestamp(kept.expires_at, UTC)
                return (f"{too_big} download it from {self.base_url}/d/{kept.token} (a link "
                        f"for this file only, until {until:%Y-%m-%d %H:%M} UTC).")
            return f"{too_big} {self._without_link(batch_id, client, name)}"
        return offered

    def _without_link(self, batch_id: int, client: str, name: str) -> str:
        """No web side to serve it: the operator is told where the file is."""
        where = self.downloads.root
        alerted = self.alerts is not None and self.alerts.send(
            f"too-big|{self.region}|{batch_id}",
            f"a reply too big for mail in region {self.region} (batch {batch_id})",
            f"Region: {self.region}\nClient: {client}\nBatch: {batch_id}\nFile: {name}\n\n"
            "The reply's ZIP is larger than the relay takes and the region has no web "
            f"side to offer it for download. It is kept in {where} (see the .json files "
            "for which one): send it to the client another way, or add a [web] section.")
        if alerted:
            return ("our operators were alerted and will send it to you another way "
                    f"(reference: batch {batch_id}).")
        return f"please ask us for it, quoting batch {batch_id}."
