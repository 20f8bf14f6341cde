"""Deliveries stream: a message goes to the relay from its file a piece at a time, the
same bytes aiosmtplib would have sent, and what a relay says (or does not) mid-way is
heard."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from purlgate.channels.outbox import Outbox
from purlgate.channels.relay import relay_sender
from purlgate.channels.relay_data import DataEncoder, Outgoing
from purlgate.channels.replies import PLACEHOLDER, attach
from purlgate.config import RelayConfig
from tests.mail_helpers import Sink, note
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]


def _as_aiosmtplib_sends(message: bytes) -> bytes:
    """What ``execute_data_command`` writes after DATA for ``message``."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def _encoded(message: bytes, piece: int) -> bytes:
    encoder, out = DataEncoder(io.BytesIO(message), piece), []
    while chunk := encoder.next():
        out.append(chunk)
    assert encoder.finished
    return b"".join(out)


def test_the_pieces_are_what_aiosmtplib_would_send_whole() -> None:
    """Lone CRs and LFs, dots at line starts (also right at a piece's edge), a line
    longer than a piece, no final line end, an empty message: the streamed bytes equal
    aiosmtplib's for the whole message, whatever the piece size."""
    fixed = [b"", b".", b"\r", b"\n", b"a\r\n.b\r\n", b".\r\n.\r\n", b"x\rb\n.c", b"..\n..",
             b"a" * 50 + b"\r\n" + b"." * 9, b"\r\n\r\n.\r"]
    rng = random.Random(7)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"b"]
    made = [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
            for _ in range(400)]
    for message in fixed + made:
        for piece in (1, 2, 3, 5, 8, 64, 1 << 16):
            assert _encoded(message, piece) == _as_aiosmtplib_sends(message), (message, piece)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _digest_relay(tmp: Path) -> AsyncIterator[tuple[int, Path]]:
    """aiosmtpd in its own process, keeping only each message's digest (in the file)."""
    port, out = _free_port(), tmp / "digests"
    relay = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
         "-s", str(200 << 20), "-c", "tests.relay_digest.Digest", str(out)], cwd=ROOT)
    try:
        async def listening() -> bool:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return True
            return False
        for _ in range(200):
            if await listening():
                break
            await asyncio.sleep(0.05)
        yield port, out
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def _big_entry(box: Outbox, tmp: Path, megabytes: int) -> Path:
    payload = tmp / "reply.zip"
    payload.write_bytes(os.urandom(megabytes << 20))
    message = note("a big reply")
    attach(message, PLACEHOLDER, maintype="application", subtype="zip", filename="reply.zip")
    box.enqueue(message, sender="s@idomoo.com", recipients=["a@acme.example"], key="big",
                attachment=payload)
    return box.queue / "big.msg"


@pytest.mark.asyncio
async def test_a_big_reply_goes_to_a_real_relay_without_being_held(tmp_path: Path) -> None:
    """A ~27 MB reply reaches a real relay (aiosmtpd, its own process) byte for byte,
    while the sending process never holds more than about 2 MB for it (tracemalloc's
    peak over the delivery; the whole message read at once alone would be 27 MB)."""
    async with _digest_relay(tmp_path) as (port, digests):
        relay = RelayConfig(host="127.0.0.1", port=port, timeout_seconds=30)
        sender = relay_sender(relay)
        box = Outbox(tmp_path / "outbox", relay, sender=sender)
        entry = _big_entry(box, tmp_path, 20)
        message = Outgoing.of_entry(entry)
        expected = hashlib.sha256(message.read()).hexdigest()
        tracemalloc.start()
        try:
            assert await box.deliver_due() is None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await sender.close()
        await eventually(digests.exists, "the relay's digest line")
        digest, size = digests.read_text().split()
    assert (digest, int(size)) == (expected, message.size)
    assert message.size > 27_000_000
    assert peak < 2_500_000, f"{peak} bytes traced at the peak of the delivery"
    assert [p.name for p in (tmp_path / "outbox" / "sent").iterdir()] == ["big.msg"]


@pytest.mark.asyncio
async def test_a_message_past_the_relays_size_is_refused_before_its_data(
        tmp_path: Path) -> None:
    """The relay refuses MAIL's SIZE (552): the message fails without its bytes being
    sent, and the connection, reset, carries the next message."""
    sink = await Sink(size=100_000).start()
    relay = RelayConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10)
    sender = relay_sender(relay)
    box = Outbox(tmp_path / "outbox", relay, sender=sender)
    box.limit = lambda: None  # not learned: the relay is asked
    _big_entry(box, tmp_path, 1)
    box.enqueue(note("small"), sender="s@idomoo.com", recipients=["a@acme.example"], key="n")
    await box.deliver_due()
    await sender.close()
    await sink.stop()
    failed = Outbox(tmp_path / "outbox", relay, sender=sender).failed
    assert [p.name for p in failed.glob("*.msg")] == ["big.msg"]
    assert sink.tried == 1 and sink.messages[0].message["Subject"] == "small"
    small = Outgoing.of_entry(box.sent / "n.msg")
    assert sink.messages[0].mail_options == [f"SIZE={small.size}"], "MAIL says the size"
    assert "relay answered 552 (Error: message size exceeds fixed maximum message size)" \
        in (failed / "big.state").read_text(), "refused at MAIL, before its bytes"
    assert len(sink.sessions) == 1, "the refused message did not cost the connection"


@pytest.mark.asyncio
async def test_a_refusal_after_the_data_keeps_the_connection(tmp_path: Path) -> None:
    """The relay takes the bytes and answers 554: the message fails permanently, and
    the same connection delivers the next one once the relay takes mail again."""
    sink = await Sink(answer="554 5.7.1 not today").start()
    relay = RelayConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10)
    sender = relay_sender(relay)
    box = Outbox(tmp_path / "outbox", relay, sender=sender)
    box.enqueue(note("refused"), sender="s@idomoo.com", recipients=["a@acme.example"], key="a")
    await box.deliver_due()
    sink.answer = "250 2.0.0 OK"
    box.enqueue(note("taken"), sender="s@idomoo.com", recipients=["a@acme.example"], key="b")
    await box.deliver_due()
    await sender.close()
    await sink.stop()
    assert [p.name for p in box.failed.glob("*.msg")] == ["a.msg"]
    assert "554" in (box.failed / "a.msg").read_text().splitlines()[0] or \
        "554" in (box.failed / "a.state").read_text()
    assert [m.message["Subject"] for m in sink.messages] == ["taken"]
    assert len(sink.sessions) == 1


async def _misbehaving_relay(behaviour: str, done: asyncio.Event) -> asyncio.Server:
    """A relay that answers 354 to DATA, then either answers 552 and hangs up after the
    first megabyte ("early"), or stops reading until ``done`` ("stalls")."""
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 relay ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-relay\r\n250 8BITMIME\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                if behaviour == "stalls":
                    await done.wait()
                    break
                await reader.readexactly(1 << 20)
                writer.write(b"552 5.3.4 message too big for this relay\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_server(session, "127.0.0.1", 0)


@pytest.mark.asyncio
@pytest.mark.parametrize(("behaviour", "outcome", "said"), [
    ("early", "failed", "relay answered 552 (5.3.4 message too big for this relay)"),
    ("stalls", "deferred", "relay unreachable: SMTPTimeoutError"),
])
async def test_a_relay_that_answers_early_or_stops_reading(
        tmp_path: Path, behaviour: str, outcome: str, said: str) -> None:
    """A relay that refuses mid-message (and hangs up) is heard: the 552 fails the
    message, not a lost connection retried for two days; one that stops reading costs
    the attempt after relay.timeout_seconds, not a delivery slot forever."""
    done = asyncio.Event()
    server = await _misbehaving_relay(behaviour, done)
    port = server.sockets[0].getsockname()[1]
    relay = RelayConfig(host="127.0.0.1", port=port, timeout_seconds=1)
    sender = relay_sender(relay)
    box = Outbox(tmp_path / "outbox", relay, sender=sender)
    _big_entry(box, tmp_path, 8)
    await asyncio.wait_for(box.deliver_due(), timeout=20)
    await sender.close()
    done.set()
    server.close()
    await server.wait_closed()
    if outcome == "failed":
        assert [p.name for p in box.failed.glob("*.msg")] == ["big.msg"]
        state = (box.failed / "big.state").read_text()
    else:
        assert [i.id for i in box.items()] == ["big"]
        state = (box.queue / "big.state").read_text()
    assert said in state
