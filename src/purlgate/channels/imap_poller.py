"""The IMAP poller: a fallback intake for a mailbox that receives the regional address.

Blocking (imap-tools), so it runs in its own thread. Each message is fetched with
BODY.PEEK[] (never marked seen), checked like SMTP mail (the From address must be a
client's allowed sender), written to the spool, and only then moved to ``Processed``;
unknown senders go to ``Rejected`` with no reply. A crash between spooling and moving
leaves the message in the folder: it is spooled again at the next poll, and the mail
worker's ledger (Message-ID + attachment sha256) answers it once. Uses IDLE when the
server offers it (renewed before the 29 minutes servers allow), else polls every
``poll_seconds``; reconnects with growing delays.

The server's capabilities are read after login (imaplib keeps the ones from before
it, where MOVE and IDLE are often missing): a message moves with UID MOVE, or else is
copied, flagged \\Deleted and removed with UID EXPUNGE of exactly that message
(UIDPLUS); a plain EXPUNGE, which removes every \\Deleted message, is the last resort:
the mailbox must be the gateway's own. A refused login, an untrusted certificate or an
unreadable password is a clear error naming server and reason: fatal at start, an
operator alert when it starts failing later.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from imap_tools import BaseMailBox, MailBox, MailBoxStartTls, MailBoxUnencrypted
from imap_tools.errors import MailboxLoginError

from purlgate.channels.mail_message import header_addresses, inbound_of
from purlgate.channels.spool import Spool, SpoolEntry
from purlgate.config import ClientConfig, ImapConfig, client_of_sender
from purlgate.errors import ConfigError

log = logging.getLogger("purlgate.imap")
MAX_BACKOFF = 300.0


def describe(exc: BaseException, config: ImapConfig) -> tuple[bool, str]:
    """(an operator must act, what went wrong) for a failure to connect or log in."""
    if isinstance(exc, MailboxLoginError):
        return True, (f"the server refused the login of {config.user!r}: check imap.user "
                      "and imap.password")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True, (f"the server's certificate is not trusted ({exc.verify_message}): "
                      "set imap.ca_file to the CA that signs it")
    if isinstance(exc, ConfigError):
        return True, exc.message
    if isinstance(exc, OSError):
        return False, f"cannot reach the server: {exc.strerror or type(exc).__name__}"
    return False, type(exc).__name__


class ImapPoller:
    def __init__(self, config: ImapConfig, *, inbound: list[str],
                 clients: Mapping[str, ClientConfig], spool: Spool,
                 on_accepted: Callable[[SpoolEntry], None],
                 on_alert: Callable[[str], object] | None = None) -> None:
        self.config = config
        self.inbound = [a.lower() for a in inbound]
        self.clients = clients
        self.spool = spool
        self.on_accepted = on_accepted
        self.on_alert = on_alert
        self.connected = threading.Event()
        self.capabilities: frozenset[str] = frozenset()

    @property
    def where(self) -> str:
        return f"IMAP {self.config.host}:{self.config.port}"

    def check_login(self) -> None:
        """At start: a login or certificate the operator must fix stops the start with a
        clear error; a server that does not answer yet is only logged (retried later)."""
        try:
            box = self._connect()
        except Exception as exc:
            fatal, why = describe(exc, self.config)
            if fatal:
                raise ConfigError(f"{self.where}: {why}") from exc
            log.warning("%s: %s; will retry", self.where, why)
            return
        with contextlib.suppress(Exception):
            box.logout()

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
        try:
            box.login(c.user, c.password.reveal().decode(), initial_folder=None)
        except BaseException:
            with contextlib.suppress(Exception):
                box.client.shutdown()  # the connection is ours to close, login or not
            raise
        # The capabilities after login (imaplib keeps the pre-login ones): imap-tools
        # reads them to choose MOVE, we to choose IDLE and UID EXPUNGE.
        status, data = box.client.capability()
        if status == "OK" and data and data[0]:
            words = data[0].decode() if isinstance(data[0], bytes) else str(data[0])
            box.client.capabilities = tuple(words.upper().split())
        self.capabilities = frozenset(str(c).upper() for c in box.client.capabilities)
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
            if len(senders) != 1 or client_of_sender(senders[0], self.clients) is None:
                log.info("IMAP message %s from an unknown sender: moved to %s, no reply",
                         uid, self.config.rejected_folder)
                self._move(box, uid, self.config.rejected_folder)
                continue
            to = [a for a in header_addresses(raw, "To") + header_addresses(raw, "Cc")
                  if inbound_of(a, self.inbound) is not None]  # +validate kept
            entry = self.spool.accept(raw, {"channel": "imap", "mail_from": senders[0],
                                            "rcpt_tos": to or self.inbound[:1]})
            log.info("IMAP message %s from %s taken in as spool entry %s", uid, senders[0],
                     entry.id)
            self.on_accepted(entry)
            self._move(box, uid, self.config.processed_folder)  # only after the spool has it
            accepted += 1
        return accepted

    def _move(self, box: BaseMailBox, uid: str, folder: str) -> None:
        if "MOVE" in self.capabilities:
            box.move(uid, folder)  # UID MOVE: one atomic step on the server
            return
        client = box.client
        status, _ = client.uid("COPY", uid, folder)
        if status != "OK":
            raise ConnectionError(f"COPY of message {uid} to {folder} refused")
        client.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        if "UIDPLUS" in self.capabilities:
            client.uid("EXPUNGE", uid)  # exactly this message
        else:
            client.expunge()  # every \\Deleted message: the mailbox must be ours alone

    def _wait(self, box: BaseMailBox, stop: threading.Event) -> None:
        timeout = self.config.poll_seconds
        if not (self.config.idle and "IDLE" in self.capabilities):
            stop.wait(timeout)
            return
        # One IDLE command (RFC 2177: renewed before the server's 30 minutes), listened
        # to in 1 s slices so that a stop is seen at once, not at the end of the wait.
        deadline = time.monotonic() + min(timeout, 29 * 60)
        box.idle.start()  # type: ignore[no-untyped-call]
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                if box.idle.poll(timeout=1.0):
                    break  # the mailbox changed
        finally:
            box.idle.stop()  # type: ignore[no-untyped-call]

    def run(self, stop: threading.Event) -> None:
        backoff = 1.0
        failing = False  # in a run of failures (alert the operator once per run)
        worked = False
        while not stop.is_set():
            box: Any = None
            try:
                box = self._connect()
                self.connected.set()
                log.info("%s: %s as %s%s", self.where,
                         "reconnected" if worked else "connected", self.config.user,
                         " (IDLE)" if "IDLE" in self.capabilities and self.config.idle
                         else f" (polling every {self.config.poll_seconds:g} s)")
                worked, failing, backoff = True, False, 1.0
                while not stop.is_set():
                    self.poll_once(box)
                    self._wait(box, stop)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect later
                self.connected.clear()
                fatal, why = describe(exc, self.config)
                log.warning("%s: %s; reconnecting in %.0f s", self.where, why, backoff)
                if fatal and not failing and self.on_alert is not None:
                    self.on_alert(f"{self.where}: {why}")
                failing = True
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                if box is not None:
                    with contextlib.suppress(Exception):
                        box.logout()
