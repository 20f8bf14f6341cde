"""Building client mail the way real clients do, and a real SMTP sink as the relay."""

from __future__ import annotations

import asyncio
import io
import zipfile
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from purlgate.app import Gateway, build_gateway, serve
from purlgate.channels.relay_data import Outgoing
from purlgate.config import RelayConfig, parse_config
from purlgate.core import archive
from tests.config_builder import region_toml

PASSWORD = b"Acme-Zip-2026!"
SENDER = "data-team@acme.example"
INBOUND = "sftp-usa@idomoo.com"


def rows(n: int = 20) -> bytes:
    lines = ["first_name,last_name,email"] + [f"Zoë{i},Tester,u{i}@acme.example"
                                              for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def aes_zip(files: dict[str, bytes], password: bytes = PASSWORD) -> bytes:
    """The demo client's AES ZIP (core.archive's writer, with its password)."""
    return archive.aes_zip(files, password)


def plain_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def client_mail(attachments: list[tuple[str, bytes, str]] | None = None, *,
                sender: str = SENDER, to: str = INBOUND, subject: str = "Spring batch",
                msgid: str | None = None, disposition: str = "attachment",
                alternative: bool = True) -> bytes:
    """multipart/mixed with a multipart/alternative body, like Outlook or Gmail."""
    msg = EmailMessage()
    msg["From"] = f"Acme Data <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = msgid or make_msgid(domain="acme.example")
    msg.set_content("Please find our file attached.")
    if alternative:
        msg.add_alternative("<p>Please find our file attached.</p>", subtype="html")
    for filename, data, ctype in attachments or []:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename,
                           disposition=disposition)
    return msg.as_bytes(policy=policy.SMTP)


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    mail_options: list[str] = field(default_factory=list)  # MAIL's parameters (SIZE=...)

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=policy.default).parsebytes(self.raw)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Sink:
    """A real SMTP server standing in for the relay; records what it is given."""

    messages: list[Captured] = field(default_factory=list)
    answer: str = "250 2.0.0 OK"
    server: asyncio.Server | None = None
    tried: int = 0  # every DATA, also those answered with something else than 250
    sessions: list[SMTP] = field(default_factory=list)  # every connection, in order
    size: int | None = None  # the SIZE it announces and enforces (None: aiosmtpd's 32 MiB)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.tried += 1
        if self.answer.startswith("250"):
            self.messages.append(Captured(str(envelope.mail_from), list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b""),
                                          list(envelope.mail_options)))
        return self.answer

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def session(self, **options: Any) -> SMTP:
        """aiosmtpd's protocol for one more connection, remembered (``stop`` ends it)."""
        if self.size is not None:
            options.setdefault("data_size_limit", self.size)
        smtp = SMTP(self, **options)
        self.sessions.append(smtp)
        return smtp

    @property
    def open_sessions(self) -> int:
        return sum(1 for s in self.sessions
                   if s.transport is not None and not s.transport.is_closing())

    async def start(self, port: int = 0) -> Sink:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.session, "127.0.0.1", port)
        return self

    async def stop(self) -> None:
        """As a relay that shuts down: no new connections, the open ones cut."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for smtp in self.sessions:
            if smtp.transport is not None:
                smtp.transport.close()

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Captured]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} messages, got {len(self.messages)}: "
                                     + "; ".join(str(m.message["Subject"])
                                                 for m in self.messages))
            await asyncio.sleep(0.05)
        return self.messages

    async def wait_to(self, address: str, count: int = 1,
                      timeout: float = 30.0) -> list[Captured]:
        """Wait until ``count`` messages for ``address`` arrived (others may interleave)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.to(address)) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} messages to {address}, got "
                                     f"{len(self.to(address))}")
            await asyncio.sleep(0.05)
        return self.to(address)

    def to(self, address: str) -> list[Captured]:
        return [m for m in self.messages if address in m.rcpt_tos]


def reply_zip(captured: Captured, password: bytes = PASSWORD) -> dict[str, bytes]:
    """The files of a reply's one AES ZIP attachment."""
    parts = list(captured.message.iter_attachments())
    assert len(parts) == 1
    return archive.read_zip(parts[0].get_payload(decode=True), password).members


async def drained(gateway: Any, timeout: float = 30.0) -> None:
    """Nothing left to do: no mail waiting in the spool, none in the outbox queue (twice
    in a row, so that a reply being queued between the two looks is seen)."""
    deadline = asyncio.get_running_loop().time() + timeout
    quiet = 0
    while quiet < 2:
        busy = await asyncio.to_thread(
            lambda: bool(gateway.spool.pending()) or bool(gateway.outbox.items()))
        quiet = 0 if busy else quiet + 1
        assert asyncio.get_running_loop().time() < deadline, "the queues never drained"
        await asyncio.sleep(0.05)


async def queues_empty(data_dir: Path, timeout: float = 60.0) -> None:
    """As ``drained``, for a gateway in another process: its data directory's spool,
    outbox queue and webhooks' queue hold nothing (twice in a row)."""
    deadline = asyncio.get_running_loop().time() + timeout
    quiet = 0
    while quiet < 2:
        busy = any((data_dir / "spool" / "incoming").glob("*.msg")) or any(
            (data_dir / "outbox" / "queue").glob("*.msg")) or any(
            (data_dir / "webhooks" / "queue").glob("*.json"))
        quiet = 0 if busy else quiet + 1
        assert asyncio.get_running_loop().time() < deadline, "the queues never drained"
        await asyncio.sleep(0.1)


T = "20261127_101500"


MAIL_CLIENTS = """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data-team@acme.example"]
notify = ["campaigns@acme.example"]
zip_password = { env = "PG_TEST_ACME_ZIP" }

[clients.acme.projects.spring]

[clients.globex]
name = "Globex"
regions = ["usa"]
senders = ["files@globex.example"]

[clients.globex.projects.main]
"""


def mail_config(relay_port: int, *, max_bytes: int = 5_000_000, min_free: int = 0,
                **smtp: object) -> str:
    """Region usa relaying to ``relay_port``, mail from acme (and globex, no password);
    ``smtp``: more of the listener's settings (TLS, limits)."""
    return region_toml(
        smtp={"port": 0, "max_message_bytes": max_bytes, "min_free_bytes": min_free, **smtp},
        relay={"host": "127.0.0.1", "port": relay_port, "retry_first_seconds": 0.2,
               "operator": "ops@idomoo.example"}) + MAIL_CLIENTS


@dataclass
class Running:
    gateway: Gateway
    sink: Sink
    stop: asyncio.Event
    task: asyncio.Task[None]
    data_dir: Path

    @property
    def port(self) -> int:
        return self.gateway.smtp_port

    async def send(self, raw: bytes, *, sender: str = SENDER, to: str = INBOUND) -> None:
        await aiosmtplib.send(raw, sender=sender, recipients=[to], hostname="127.0.0.1",
                              port=self.port, start_tls=False)

    def spooled(self) -> list[Path]:
        return sorted((self.data_dir / "spool" / "incoming").glob("*.msg"))

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


async def start(tmp_path: Path, sink: Sink, *, max_bytes: int = 5_000_000,
                min_free: int = 0, data_dir: Path | None = None, text: str | None = None,
                **smtp: object) -> Running:
    """The gateway of ``mail_config`` (or of ``text``) served in this loop, once it is
    ready."""
    config = parse_config(text or mail_config(sink.port, max_bytes=max_bytes,
                                              min_free=min_free, **smtp))
    data_dir = data_dir or tmp_path / "state"
    gateway = build_gateway(config, "usa", data_dir=data_dir)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop, lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 10)
    return Running(gateway, sink, stop, task, data_dir)


def good_mail(name: str = f"acme_spring_{T}_00", **kw: object) -> bytes:
    return client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": rows()}), "application/zip")],
                       **kw)  # type: ignore[arg-type]


RELAY = RelayConfig(retry_first_seconds=60, retry_max_seconds=600, expire_seconds=3600,
                    operator="ops@idomoo.example")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def note(subject: str = "hello") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "sftp-usa@idomoo.com"
    m["To"] = "data-team@acme.example"
    m["Subject"] = subject
    m.set_content("body")
    return m


def outgoing(path: Path, wire: bytes) -> Outgoing:
    """``wire`` (CRLF, as the outbox stores a message) in an outbox entry file at
    ``path``, as a sender is handed it."""
    path.write_bytes(b'{"sender": "s@idomoo.com"}\n' + wire)
    return Outgoing.of_entry(path)
