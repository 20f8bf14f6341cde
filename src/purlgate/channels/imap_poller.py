"""The IMAP poller: a fallback intake for a mailbox that receives the regional address.

Blocking (imap-tools), so it runs in its own thread. Each message is fetched with
BODY.PEEK[] (never marked seen), checked like SMTP mail (the From address must be a
client's allowed sender), written to the spool, and only then moved to ``Processed``;
unknown senders go to ``Rejected`` with no reply. A crash between spooling and moving
leaves the message in the folder: it is spooled again at the next poll, and the mail
worker's ledger (Message-ID + attachment sha256) answers it once. Uses IDLE when the
server offers it, else polls every ``poll_seconds``; reconnects with growing delays.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from imap_tools import BaseMailBox, MailBox, MailBoxStartTls, MailBoxUnencrypted

from purlgate.channels.mail_message import header_addresses
from purlgate.channels.smtp_listener import client_of
from purlgate.channels.spool import Spool, SpoolEntry
from purlgate.config import ClientConfig, ImapConfig

log = logging.getLogger("purlgate.imap")
MAX_BACKOFF = 300.0


class ImapPoller:
    def __init__(self, config: ImapConfig, *, inbound: list[str],
                 clients: Mapping[str, ClientConfig], spool: Spool,
                 on_accepted: Callable[[SpoolEntry], None]) -> None:
        self.config = config
        self.inbound = [a.lower() for a in inbound]
        self.clients = clients
        self.spool = spool
        self.on_accepted = on_accepted
        self.connected = threading.Event()

    def _connect(self) -> BaseMailBox:
        c = self.config
        box: BaseMailBox
        context = ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None)
        if c.tls == "ssl":
            box = MailBox(c.host, c.port, ssl_context=context)
        elif c.tls == "starttls":
            box = MailBoxStartTls(c.host, c.port, ssl_context=context)
        else:
            box = MailBoxUnencrypted(c.host, c.port)
        box.login(c.user, c.password.reveal().decode(), initial_folder=None)
        for folder in (c.processed_folder, c.rejected_folder):
            if not box.folder.exists(folder):
                box.folder.create(folder)
        box.folder.set(c.folder)
        return box

    def _raw(self, box: BaseMailBox, uid: str) -> bytes | None:
        status, data = box.client.uid("FETCH", uid, "(BODY.PEEK[])")
        if status != "OK":
            return None
        for item in data:
            if isinstance(item, tuple) and len(item) == 2:
                return bytes(item[1])
        return None

    def poll_once(self, box: BaseMailBox) -> int:
        """Spool every message in the folder; return how many were accepted."""
        accepted = 0
        box.folder.set(self.config.folder)
        for uid in box.uids():
            raw = self._raw(box, uid)
            if raw is None:
                continue
            senders = header_addresses(raw, "From")
            if len(senders) != 1 or client_of(senders[0], self.clients) is None:
                log.info("IMAP message %s from an unknown sender: moved to %s, no reply",
                         uid, self.config.rejected_folder)
                box.move(uid, self.config.rejected_folder)
                continue
            to = [a for a in header_addresses(raw, "To") + header_addresses(raw, "Cc")
                  if a in self.inbound]
            entry = self.spool.accept(raw, {"channel": "imap", "mail_from": senders[0],
                                            "rcpt_tos": to or self.inbound[:1]})
            self.on_accepted(entry)
            box.move(uid, self.config.processed_folder)  # only after the spool has it
            accepted += 1
        return accepted

    def _wait(self, box: BaseMailBox, stop: threading.Event) -> None:
        timeout = self.config.poll_seconds
        if self.config.idle and b"IDLE" in getattr(box.client, "capabilities", ()):
            box.idle.wait(timeout=min(timeout, 29 * 60))  # RFC 2177: renew before 30 min
        else:
            stop.wait(timeout)

    def run(self, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            box: Any = None
            try:
                box = self._connect()
                self.connected.set()
                backoff = 1.0
                while not stop.is_set():
                    self.poll_once(box)
                    self._wait(box, stop)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect later
                self.connected.clear()
                log.warning("IMAP %s:%d: %s; reconnecting in %.0f s", self.config.host,
                            self.config.port, type(exc).__name__, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                if box is not None:
                    with contextlib.suppress(Exception):
                        box.logout()
