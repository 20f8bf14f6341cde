"""The SMTP listener: aiosmtpd hooks that map SMTP onto the spool, and back to replies.

No open relay: RCPT is accepted only for the region's inbound addresses (else
550 5.7.1). MAIL FROM must be an allowed sender of a client and the From header the
same address (else 550 5.7.1, during the session: an unknown sender never gets a
bounce or a reply). SIZE is advertised and enforced by aiosmtpd (552 at MAIL for a
declared size, 552 after DATA for a body over the limit, with the excess discarded).
250 is said only after the message is fsynced in the spool; a fault answers 451 and
low disk 452, and neither leaves a spool file. aiosmtpd ends DATA only on a line that
is exactly ".", so "\\n.\\r\\n" or "\\r.\\r\\n" inside a message cannot smuggle a second one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from purlgate.channels.mail_message import header_addresses
from purlgate.channels.spool import Spool, SpoolEntry, SpoolFullError
from purlgate.config import ClientConfig, SmtpConfig

log = logging.getLogger("purlgate.smtp")
SPOOL_THREADS = 32

REFUSED_SENDER = "550 5.7.1 Sender not authorized to submit data files here"
REFUSED_RCPT = "550 5.7.1 Relaying denied: this server accepts mail for its own addresses only"
REFUSED_FROM = "550 5.7.1 From header must be the authorized sender of the envelope"
LOCAL_ERROR = "451 4.3.0 Local error in processing; please try again later"
NO_SPACE = "452 4.3.1 Insufficient system storage; please try again later"


def client_of(sender: str, clients: Mapping[str, ClientConfig]) -> str | None:
    sender = sender.lower()
    return next((cid for cid, c in clients.items() if sender in c.senders), None)


class SmtpHandler:
    def __init__(self, *, inbound: set[str], clients: Mapping[str, ClientConfig],
                 spool: Spool, on_accepted: Callable[[SpoolEntry], None]) -> None:
        self.inbound = {a.lower() for a in inbound}
        self.clients = clients
        self.spool = spool
        self.on_accepted = on_accepted
        # Spooling waits on fsync, not on the CPU: more threads than the default pool's
        # (cores + 4) let concurrent sessions share journal commits.
        self._io = ThreadPoolExecutor(max_workers=SPOOL_THREADS, thread_name_prefix="spool")
        self.outcomes: Counter[str] = Counter()  # messages by outcome, for the metrics

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,  # noqa: N802
                          address: str, mail_options: list[str]) -> str:
        if client_of(address, self.clients) is None:
            log.info("refused sender from %s", session.peer[0] if session.peer else "?")
            self.outcomes["refused-sender"] += 1
            return REFUSED_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,  # noqa: N802
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() not in self.inbound:
            log.info("refused recipient (no relay) from %s",
                     session.peer[0] if session.peer else "?")
            self.outcomes["refused-relay"] += 1
            return REFUSED_RCPT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session,  # noqa: N802
                          envelope: Envelope) -> str:
        try:
            raw = envelope.original_content or b""
            sender = (envelope.mail_from or "").lower()
            if header_addresses(raw, "From") != [sender]:
                log.info("refused a From header that is not the sender's")
                self.outcomes["refused-from"] += 1
                return REFUSED_FROM
            meta = {"channel": "smtp", "mail_from": sender,
                    "rcpt_tos": [r.lower() for r in envelope.rcpt_tos]}
            loop = asyncio.get_running_loop()
            entry = await loop.run_in_executor(self._io, self.spool.accept, raw, meta)
        except SpoolFullError:
            log.warning("spool below its free-space floor: answering 452")
            self.outcomes["no-space"] += 1
            return NO_SPACE
        except Exception:
            log.exception("accepting a message failed: answering 451")
            self.outcomes["error"] += 1
            return LOCAL_ERROR
        self.outcomes["accepted"] += 1
        log.info("accepted a message from %s as spool entry %s", sender, entry.id)
        self.on_accepted(entry)
        return f"250 2.0.0 OK queued as {entry.id}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__)
        return LOCAL_ERROR


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class ConnectionLimits:
    """Sessions open, in total and per client address (touched on the loop only)."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total, self.per_ip = total, per_ip
        self.open: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        if sum(self.open.values()) >= self.total or self.open.get(ip, 0) >= self.per_ip:
            return False
        self.open[ip] = self.open.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        left = self.open.get(ip, 0) - 1
        if left > 0:
            self.open[ip] = left
        else:
            self.open.pop(ip, None)


class LimitedSMTP(SMTP):
    """aiosmtpd's session, refused with 421 4.7.0 beyond the connection limits."""

    def __init__(self, handler: SmtpHandler, *, limits: ConnectionLimits,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._outcomes = handler.outcomes
        self._ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._ip is None:  # not the STARTTLS re-entry: a new connection
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if peer else "?"
            if not self._limits.admit(ip):
                log.info("refused a connection from %s: too many connections", ip)
                self._outcomes["refused-too-many"] += 1
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
            self._ip = ip
        super().connection_made(transport)

    def _timeout_cb(self) -> None:
        # As Postfix does: say why before closing (aiosmtpd closes without a word).
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.4.2 Error: timeout exceeded\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        if self._ip is None:
            return  # refused at connect: nothing was set up
        self._limits.release(self._ip)
        super().connection_lost(error)


async def start_smtp(handler: SmtpHandler, config: SmtpConfig) -> asyncio.Server:
    """Listen on config.host:config.port (port 0: any free port)."""
    context = tls_context(config)
    limits = ConnectionLimits(config.max_connections, config.max_connections_per_ip)

    def factory() -> Any:
        return LimitedSMTP(handler, limits=limits, data_size_limit=config.max_message_bytes,
                           hostname=config.hostname, ident="purlgate ESMTP",
                           tls_context=context, require_starttls=config.require_starttls,
                           enable_SMTPUTF8=True, timeout=config.timeout_seconds)

    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=config.host, port=config.port)
