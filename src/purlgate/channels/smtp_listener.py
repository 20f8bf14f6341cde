"""The SMTP listener: aiosmtpd hooks that map SMTP onto the spool, and back to replies.

No open relay: RCPT is accepted only for the region's inbound addresses (else
550 5.7.1). MAIL FROM must be an allowed sender of a client and the From header the
same address (else 550 5.7.1, during the session: an unknown sender never gets a
bounce or a reply). SIZE is advertised and enforced (552 at MAIL for a
declared size, 552 after DATA for a body over the limit, with the excess discarded).
DATA streams to the spool file as it arrives (our ``smtp_DATA``, aiosmtpd's rules kept):
a session holds a few hundred kB whatever the message size, and the From check reads
the header block back from disk off the event loop. 250 is said only after the message
is fsynced in the spool; a fault answers 451 and a full or low disk 452, and neither
leaves a spool file. DATA ends only on a line that is exactly ".", so "\\n.\\r\\n" or
"\\r.\\r\\n" inside a message cannot smuggle a second one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from purlgate.channels.mail_message import header_addresses, inbound_of
from purlgate.channels.sender_policy import Checks, Refusal, decide
from purlgate.channels.spool import Spool, SpoolEntry, SpoolWriter
from purlgate.config import ClientConfig, SmtpConfig, client_of_sender
from purlgate.errors import ServerError, SpoolFullError

log = logging.getLogger("purlgate.smtp")
SPOOL_THREADS = 32
FLUSH_BYTES = 256 * 1024  # DATA is written to the spool file in pieces of about this

REFUSED_SENDER = "550 5.7.1 Sender not authorized to submit data files here"
REFUSED_RCPT = "550 5.7.1 Relaying denied: this server accepts mail for its own addresses only"
REFUSED_FROM = "550 5.7.1 From header must be the authorized sender of the envelope"
LOCAL_ERROR = "451 4.3.0 Local error in processing; please try again later"
NO_SPACE = "452 4.3.1 Insufficient system storage; please try again later"
PAUSED = "451 4.3.0 Temporarily unable to accept mail (database unreachable); try again later"


class SmtpHandler:
    def __init__(self, *, inbound: set[str], clients: Mapping[str, ClientConfig],
                 spool: Spool, on_accepted: Callable[[SpoolEntry], None],
                 checks: Checks | None = None) -> None:
        self.inbound = {a.lower() for a in inbound}
        self.clients = clients
        self.spool = spool
        self.on_accepted = on_accepted
        self.checks = checks
        # Spooling waits on fsync, not on the CPU: more threads than the default pool's
        # (cores + 4) let concurrent sessions share journal commits.
        self.io = ThreadPoolExecutor(max_workers=SPOOL_THREADS, thread_name_prefix="spool")
        self.outcomes: Counter[str] = Counter()  # messages by outcome, for the metrics
        # True while the region's database cannot be reached (several instances): mail
        # is not taken then, the sending server keeps it and tries again.
        self.paused: Callable[[], bool] = lambda: False

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,  # noqa: N802
                          address: str, mail_options: list[str]) -> str:
        if client_of_sender(address, self.clients) is None:
            log.info("refused sender from %s", session.peer[0] if session.peer else "?")
            self.outcomes["refused-sender"] += 1
            return REFUSED_SENDER
        if self.paused():
            self.outcomes["paused"] += 1
            return PAUSED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,  # noqa: N802
                          address: str, rcpt_options: list[str]) -> str:
        if inbound_of(address, self.inbound) is None:
            log.info("refused recipient (no relay) from %s",
                     session.peer[0] if session.peer else "?")
            self.outcomes["refused-relay"] += 1
            return REFUSED_RCPT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    def begin(self, envelope: Envelope, session: Session | None = None) -> SpoolWriter:
        """The spool entry of the message about to arrive (its file is made at its first
        write, off the event loop); SpoolFullError when the disk is below its floor. The
        connecting address and HELO name go with it (SPF, the audit trail)."""
        peer = session.peer if session is not None else None
        meta = {"channel": "smtp", "mail_from": (envelope.mail_from or "").lower(),
                "rcpt_tos": [r.lower() for r in envelope.rcpt_tos],
                "peer": str(peer[0]) if isinstance(peer, tuple) else None,
                "helo": session.host_name if session is not None else None}
        return self.spool.begin(meta)

    async def discard(self, writer: SpoolWriter) -> None:
        if writer.started:  # else there is no file: no trip off the loop for nothing
            await asyncio.get_running_loop().run_in_executor(self.io, writer.discard)

    async def finish(self, envelope: Envelope, writer: SpoolWriter, tail: bytes) -> str:
        """The rest of the message (``tail``: all of a small one) goes to ``writer``, its
        From header is checked, the sender checks the client's policy asks for are made,
        and it is committed, in one trip off the event loop. Never leaves a partial file."""
        sender = (envelope.mail_from or "").lower()
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                self.io, _accept, writer, tail, sender, self._check_sender)
        except SenderRefusedError as refused:
            self.outcomes["refused-auth"] += 1
            log.info("refused a message from %s: %s", sender, refused.refusal.reason)
            await self.discard(writer)
            return refused.refusal.smtp
        except SpoolFullError:
            refusal = self.no_space()
        except Exception:
            log.exception("accepting a message failed: answering 451")
            self.outcomes["error"] += 1
            refusal = LOCAL_ERROR
        else:
            if entry is not None:
                self.outcomes["accepted"] += 1
                log.info("accepted a message from %s as spool entry %s", sender, entry.id)
                self.on_accepted(entry)
                return f"250 2.0.0 OK queued as {entry.id}"
            log.info("refused a From header that is not the sender's")
            self.outcomes["refused-from"] += 1
            refusal = REFUSED_FROM
        await self.discard(writer)
        return refusal

    def _check_sender(self, writer: SpoolWriter, sender: str) -> Refusal | None:
        """At DATA's end, in a spool thread: the checks a client's require-* policy
        needs before the 250 (under "record" the mail worker checks, and records)."""
        client_id = client_of_sender(sender, self.clients)
        if self.checks is None or client_id is None:
            return None
        policy = self.clients[client_id].sender_auth
        if policy == "record":
            return None
        if self.checks.trusts_headers:
            verdicts = self.checks.from_headers(writer.headers())
        else:
            with writer.reader() as message:  # read once from the spool file
                verdicts = self.checks.verify(message, ip=writer.meta.get("peer"),
                                              helo=writer.meta.get("helo"), mail_from=sender)
        return decide(policy, verdicts)

    def no_space(self) -> str:
        log.warning("spool full or below its free-space floor: answering 452")
        self.outcomes["no-space"] += 1
        return NO_SPACE

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__)
        return LOCAL_ERROR


class SenderRefusedError(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.smtp)
        self.refusal = refusal


def _accept(writer: SpoolWriter, tail: bytes, sender: str,
            check: Callable[[SpoolWriter, str], Refusal | None]) -> SpoolEntry | None:
    """In a spool thread: the message's last piece written, its From header checked
    against the envelope sender, the sender checks made, and committed; None when the
    From is not the sender's (the caller discards the file), SenderRefusedError when
    the client's policy refuses it."""
    if tail:
        writer.write(tail)
    if header_addresses(writer.headers(), "From") != [sender]:
        return None
    refusal = check(writer, sender)
    if refusal is not None:
        raise SenderRefusedError(refusal)
    return writer.commit()


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class DataState(Enum):
    """Where a DATA transfer stands; past OK the rest is drained, then refused."""

    OK = "ok"
    TOO_LONG = "too-long"  # a line over the limit
    TOO_MUCH = "too-much"  # over the SIZE limit
    NO_SPACE = "no-space"  # the spool's disk is full (452, counted by no_space())
    ERROR = "error"  # writing the spool file failed


# What DATA answers when it ended in each state but OK and NO_SPACE.
DATA_REFUSALS: Mapping[DataState, str] = {
    DataState.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    DataState.TOO_MUCH: "552 Error: Too much mail data",
    DataState.ERROR: LOCAL_ERROR,
}


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

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        """aiosmtpd's DATA, streaming: each line goes to the spool file as it arrives
        (in pieces of FLUSH_BYTES, written off the loop), so a session holds about that
        much whatever the message size. Kept from aiosmtpd: the end is only a line that
        is exactly ".", dot-unstuffing, 552 past the size limit and 500 for an overlong
        line, both said after the data is drained, with nothing stored."""
        writer = await self._data_begins(arg)
        if writer is None:
            return
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            received = await self._receive(writer)
            if received is None:
                return  # the connection went away: never committed (see finally)
            state, tail = received
            handler: SmtpHandler = self.event_handler
            assert self.envelope is not None
            if state is DataState.OK:
                status = await handler.finish(self.envelope, writer, tail)  # commits or discards
            else:
                await handler.discard(writer)
                status = (handler.no_space() if state is DataState.NO_SPACE
                          else DATA_REFUSALS[state])
            writer = None
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(status)
        finally:
            if writer is not None:  # the connection went away mid-DATA (being cancelled:
                writer.discard()  # no await here, the file goes now)

    async def _data_begins(self, arg: str) -> SpoolWriter | None:
        """DATA's preconditions as aiosmtpd checks them, then a spool file; None when
        the answer has been said (503, 501, 452, 451)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return None
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return None
        if arg:
            await self.push("501 Syntax: DATA")
            return None
        handler: SmtpHandler = self.event_handler
        try:
            return handler.begin(self.envelope, self.session)
        except SpoolFullError:
            await self.push(handler.no_space())
        except Exception:
            log.exception("starting a spool entry failed: answering 451")
            handler.outcomes["error"] += 1
            await self.push(LOCAL_ERROR)
        return None

    async def _receive(self, writer: SpoolWriter) -> tuple[DataState, bytes] | None:
        """Read DATA up to the lone dot into ``writer``: the state it ended in and the
        last piece, not written yet (None: the connection went away first). Past a
        problem the rest is drained, not stored."""
        state = DataState.OK
        pending = bytearray()
        size = 0
        fragments: list[bytes] = []
        limit = self.data_size_limit
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                state = DataState.TOO_LONG if state is DataState.OK else state
                line = await self._reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                return state, bytes(pending)
            size += len(line)
            if state is DataState.OK and limit and size > limit:
                state = DataState.TOO_MUCH
            fragments.append(line)
            if not line.endswith(b"\r\n"):
                continue
            whole = b"".join(fragments)
            fragments.clear()
            if state is not DataState.OK:
                continue
            if len(whole) > self.line_length_limit:
                state = DataState.TOO_LONG
                continue
            pending += whole[1:] if whole.startswith(b".") else whole
            if len(pending) >= FLUSH_BYTES:
                piece, pending = bytes(pending), bytearray()
                state = await self._write(writer, piece)  # on failure: drain, then say
        return None

    async def _write(self, writer: SpoolWriter, piece: bytes) -> DataState:
        handler: SmtpHandler = self.event_handler
        try:
            await asyncio.get_running_loop().run_in_executor(handler.io, writer.write, piece)
        except SpoolFullError:
            return DataState.NO_SPACE
        except ServerError:
            log.exception("writing a spool file failed: answering 451")
            handler.outcomes["error"] += 1
            return DataState.ERROR
        return DataState.OK

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
