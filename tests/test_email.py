"""The email channel end to end, against real servers on 127.0.0.1.

The gateway's aiosmtpd listener (port 0) is driven by aiosmtplib, smtplib and swaks;
its relay is a real aiosmtpd sink; replies are opened with pyzipper and with 7z.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import shutil
import subprocess
from collections.abc import AsyncIterator
from email import policy
from email.parser import BytesParser
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio
from aiosmtpd import __version__ as aiosmtpd_version
from aiosmtpd.smtp import SMTP

from purlgate.app import build_gateway
from purlgate.channels.smtp_listener import FLUSH_BYTES, start_smtp
from purlgate.channels.spool import SpoolWriter
from purlgate.config import parse_config
from tests.config_builder import own
from tests.mail_helpers import (
    INBOUND,
    PASSWORD,
    SENDER,
    Running,
    Sink,
    T,
    aes_zip,
    client_mail,
    drained,
    good_mail,
    mail_config,
    plain_zip,
    reply_zip,
    rows,
    start,
)
from tests.tls_helpers import self_signed
from tests.waiting import eventually


@pytest_asyncio.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


@pytest_asyncio.fixture
async def running(tmp_path: Path, sink: Sink,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    r = await start(tmp_path, sink)
    yield r
    await r.shutdown()


@pytest.mark.asyncio
async def test_reply_headers_cannot_be_smuggled_and_non_ascii_survives(
        running: Running) -> None:
    """A subject whose encoded words hide a line break and a Bcc: line gets its one
    reply with that text kept on the subject line and no header added; a subject in
    French comes back intact (RFC 2047)."""
    evil = good_mail(f"acme_spring_{T}_01", msgid="<evil@acme.example>").replace(
        b"Subject: Spring batch",
        b"Subject: =?utf-8?q?Spring=0D=0ABcc:_victim@evil.example?=")
    await running.send(evil)
    await running.send(good_mail(f"acme_spring_{T}_02", msgid="<fr@acme.example>",
                                 subject="Données de printemps"))
    replies = {str(r.message["In-Reply-To"]): r for r in await running.sink.wait_to(SENDER, 2)}
    await drained(running.gateway)
    reply = replies["<evil@acme.example>"]
    assert reply.rcpt_tos == [SENDER]
    assert reply.message["Subject"] == "Re: Spring Bcc: victim@evil.example"
    assert "Bcc" not in reply.message and b"\r\nBcc:" not in reply.raw
    assert "Your data file was processed" in str(
        reply.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    assert replies["<fr@acme.example>"].message["Subject"] == "Re: Données de printemps"
    assert all(m.rcpt_tos != ["victim@evil.example"] for m in running.sink.messages)
    assert len(running.sink.to(SENDER)) == 2


@pytest.mark.asyncio
async def test_happy_path_reply_and_notifications(running: Running, tmp_path: Path) -> None:
    """A 20-row AES ZIP gets a threaded reply with the PURL file in an AES-256 ZIP that
    pyzipper and 7-Zip open with the same password; notifications go to the project.
    The project has a flag file, but mail delivers none: the batch lists only the PURL
    file as its output."""
    raw = good_mail(msgid="<m1@acme.example>")
    await running.send(raw)
    replies = await running.sink.wait_to(SENDER)
    await running.sink.wait_to("campaigns@acme.example", 2)
    assert len(replies) == 1
    [batch] = running.gateway.region.store.recent()
    assert batch.outputs == (f"PURL_acme_spring_{T}_00.csv",)
    reply = replies[0].message
    assert reply["From"] == INBOUND and reply["To"] == SENDER
    assert reply["Subject"] == "Re: Spring batch"
    assert reply["In-Reply-To"] == "<m1@acme.example>"
    assert reply["References"] == "<m1@acme.example>"
    body = reply.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Status: Done" in body and "Rows read: 20; in the PURL file: 20" in body
    assert "Zoë" not in body, "no row data in a reply body"
    assert "open it with 7-Zip or WinZip (Windows), The Unarchiver or Keka (macOS)" in body
    assert "Archive Utility and older versions of Windows Explorer cannot open" in body
    files = reply_zip(replies[0])
    assert list(files) == [f"PURL_acme_spring_{T}_00.csv"]
    lines = files[f"PURL_acme_spring_{T}_00.csv"].decode().splitlines()
    assert len(lines) == 21 and lines[0].endswith(",thumbnail_1,landingPage")
    # 7-Zip opens it too, and sees AES-256.
    seven = shutil.which("7z")
    assert seven, "7z is needed (p7zip-full)"
    zpath = tmp_path / "reply.zip"
    zpath.write_bytes(next(reply.iter_attachments()).get_payload(decode=True))
    listing = subprocess.run([seven, "l", "-slt", f"-p{PASSWORD.decode()}", str(zpath)],
                             capture_output=True, text=True, check=True).stdout
    assert "Method = AES-256 Deflate" in listing
    out = tmp_path / "7z-out"
    subprocess.run([seven, "x", f"-p{PASSWORD.decode()}", f"-o{out}", str(zpath)],
                   capture_output=True, check=True)
    assert (out / f"PURL_acme_spring_{T}_00.csv").read_bytes() == \
        files[f"PURL_acme_spring_{T}_00.csv"]
    # Both SHA-256 values, for the client to check what we received and what they got.
    sent_zip = next(p for p in BytesParser(policy=policy.default).parsebytes(raw)
                    .iter_attachments()).get_payload(decode=True)
    received = hashlib.sha256(sent_zip).hexdigest()
    made = hashlib.sha256(files[f"PURL_acme_spring_{T}_00.csv"]).hexdigest()
    assert (f"SHA-256 of the file we received (acme_spring_{T}_00.zip): {received}\n"
            f"SHA-256 of the PURL file we made: {made}\n") in body.replace("\r\n", "\n")
    assert (batch.sha256, batch.purl_sha256) == (received, made)
    assert batch.source is not None and batch.source.startswith(f"{SENDER} from 127.0.0.1")
    notes = running.sink.to("campaigns@acme.example")
    assert sorted(str(n.message["Subject"]) for n in notes) == [
        f"[purlgate] batch done: acme_spring_{T}_00.csv",
        f"[purlgate] batch loaded: acme_spring_{T}_00.csv",
    ]
    done = next(n for n in notes if "batch done" in str(n.message["Subject"]))
    done_text = done.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"SHA-256 of the PURL file we made: {made}" in done_text
    assert all("Zoë" not in n.raw.decode("utf-8", "replace") for n in notes)
    assert running.spooled() == []


@pytest.mark.asyncio
async def test_no_open_relay(running: Running) -> None:
    """Any recipient but the region's address: 550 5.7.1, nothing stored."""
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as err:
        await running.send(good_mail(), to="someone@elsewhere.example")
    assert err.value.recipients[0].code == 550
    assert "5.7.1 Relaying denied" in err.value.recipients[0].message
    assert running.spooled() == []


@pytest.mark.asyncio
async def test_unknown_sender_refused_in_session(running: Running) -> None:
    """An unknown envelope sender is refused at MAIL; no bounce, no reply is ever sent."""
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await running.send(good_mail(sender="mallory@evil.example"),
                           sender="mallory@evil.example")
    assert err.value.code == 550
    assert "5.7.1" in err.value.message
    await drained(running.gateway)
    assert running.sink.messages == []
    assert running.spooled() == []


@pytest.mark.asyncio
async def test_from_header_must_match_envelope(running: Running) -> None:
    """A known envelope sender with another From header is refused after DATA."""
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await running.send(good_mail(sender="mallory@evil.example"))
    assert err.value.code == 550
    assert "From header" in err.value.message
    assert running.spooled() == []


@pytest.mark.asyncio
async def test_size_limits(tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIZE over the limit: 552 at MAIL. A body over it: 552 after DATA. Nothing stored."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    r = await start(tmp_path, sink, max_bytes=20_000)
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=r.port, start_tls=False)
        await client.connect()
        await client.ehlo()
        assert "size" in client.esmtp_extensions
        response = await client.execute_command(f"MAIL FROM:<{SENDER}> SIZE=50000".encode())
        assert response.code == 552
        await client.execute_command(b"RSET")
        # No SIZE declared: the body itself goes over the limit.
        await client.mail(SENDER)
        await client.rcpt(INBOUND)
        big = client_mail([("big.zip", b"x" * 60_000, "application/zip")])
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await client.data(big)
        assert err.value.code == 552
        await client.quit()
        assert r.spooled() == []
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_low_disk_answers_452(tmp_path: Path, sink: Sink,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the free-space floor the answer is 452 and nothing is stored."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    r = await start(tmp_path, sink, min_free=1 << 62)
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await r.send(good_mail())
        assert err.value.code == 452
        assert r.spooled() == []
        assert list(own(r.data_dir / "spool" / "tmp").iterdir()) == []
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_fault_in_handler_answers_451(running: Running,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault while storing answers 451 (never aiosmtpd's 500) and leaves no spool file."""
    def broken() -> None:
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(SpoolWriter, "commit", lambda self: broken())
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await running.send(good_mail())
    assert err.value.code == 451
    assert running.spooled() == []


@pytest.mark.asyncio
async def test_smuggling_is_one_message(running: Running) -> None:
    """Bare-LF and bare-CR dots inside DATA do not end it: one message, one spool entry."""
    smuggled = (b"From: " + SENDER.encode() + b"\r\nTo: " + INBOUND.encode() +
                b"\r\nSubject: s\r\n\r\nhello\n.\r\nMAIL FROM:<" + SENDER.encode() +
                b">\r\nRCPT TO:<" + INBOUND.encode() + b">\r\nDATA\r\nsecond\r.\r\nend\r\n")
    accepted: list[str] = []
    original = running.gateway.handler.on_accepted
    running.gateway.handler.on_accepted = lambda e: (accepted.append(e.id), original(e))  # type: ignore[assignment,func-returns-value]
    # Raw bytes on the wire: smtplib would "fix" the bare LF and CR and hide the attack.
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)

    async def say(line: bytes) -> bytes:
        writer.write(line)
        await writer.drain()
        return await reader.readline()

    await reader.readline()  # banner
    assert (await say(b"HELO client.example\r\n")).startswith(b"250")
    assert (await say(f"MAIL FROM:<{SENDER}>\r\n".encode())).startswith(b"250")
    assert (await say(f"RCPT TO:<{INBOUND}>\r\n".encode())).startswith(b"250")
    assert (await say(b"DATA\r\n")).startswith(b"354")
    answer = await say(smuggled + b".\r\n")
    assert answer.startswith(b"250 2.0.0 OK queued as")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    assert len(accepted) == 1
    replies = await running.sink.wait_to(SENDER)
    await drained(running.gateway)
    assert len(running.sink.messages) == 1, "one (failure) reply for one message"
    assert "no ZIP attachment" in replies[0].raw.decode()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("attachments", "reason"),
    [
        ([("a.zip", aes_zip({f"a_{T}.csv": rows()}, b"not-the-password"), "application/zip")],
         "the password does not open the ZIP; use the agreed password"),
        ([("a.zip", plain_zip({f"a_{T}.csv": rows()}), "application/zip")],
         "the ZIP is not password-protected; protect it with the agreed password using "
         "AES-256 encryption"),
        ([], "the message has no ZIP attachment; attach the data file zipped with the agreed "
             "password (AES-256)"),
        ([("a.zip", aes_zip({f"a_{T}.csv": rows()}), "application/zip"),
          ("b.zip", aes_zip({f"b_{T}.csv": rows()}), "application/zip")],
         "the message has 2 ZIP attachments (a.zip, b.zip); send one ZIP per message"),
        ([("a.zip", aes_zip({f"a_{T}.csv": rows(), f"b_{T}.csv": rows()}), "application/zip")],
         f"the ZIP holds 2 data files (a_{T}.csv, b_{T}.csv); send one data file per ZIP"),
    ],
    ids=["wrong-password", "not-encrypted", "no-attachment", "two-attachments", "two-files"],
)
async def test_failure_replies(running: Running, attachments: list[tuple[str, bytes, str]],
                               reason: str) -> None:
    """Each failure gets a plain reply to the sender saying what to fix, no attachment."""
    await running.send(client_mail(attachments))
    replies = await running.sink.wait_to(SENDER)
    await drained(running.gateway)
    assert len(replies) == 1
    reply = replies[0].message
    assert list(reply.iter_attachments()) == []
    body = reply.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"What to fix: {reason}." in body
    if len(attachments) == 1:  # a batch was opened: what we received, for the client
        zip_sha = hashlib.sha256(attachments[0][1]).hexdigest()
        assert f"SHA-256 of the file we received (a.zip): {zip_sha}" in body
    assert "not-the-password" not in replies[0].raw.decode()
    assert PASSWORD.decode() not in replies[0].raw.decode()


@pytest.mark.asyncio
async def test_zipcrypto_refused_on_this_channel(running: Running, tmp_path: Path) -> None:
    """A ZipCrypto ZIP with the right password is still refused: AES is required."""
    src = tmp_path / "zc"
    src.mkdir()
    (src / f"a_{T}.csv").write_bytes(rows())
    subprocess.run(["zip", "-q", "-P", PASSWORD.decode(), "a.zip", f"a_{T}.csv"], cwd=src,
                   check=True)
    await running.send(client_mail([("a.zip", (src / "a.zip").read_bytes(),
                                     "application/x-zip-compressed")]))
    reply = (await running.sink.wait_to(SENDER))[0]
    body = reply.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "old ZipCrypto encryption" in body


@pytest.mark.asyncio
async def test_same_message_twice_is_processed_once(running: Running) -> None:
    """The same Message-ID and attachment delivered twice: one batch, one reply."""
    raw = good_mail(msgid="<twice@acme.example>")
    await running.send(raw)
    await running.send(raw)
    await running.sink.wait_to(SENDER)
    await drained(running.gateway)
    assert len(running.sink.to(SENDER)) == 1
    assert running.gateway.region.store.recent() and \
        len(running.gateway.region.store.recent()) == 1


@pytest.mark.asyncio
async def test_two_messages_same_data_name(running: Running) -> None:
    """Different messages whose ZIPs hold the same data-file name: one done, one refused."""
    await asyncio.gather(running.send(good_mail(msgid="<a@acme.example>")),
                         running.send(good_mail(msgid="<b@acme.example>", subject="again")))
    await running.sink.wait_to(SENDER, 2)
    bodies = sorted(m.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
                    for m in running.sink.to(SENDER))
    assert len(bodies) == 2
    assert sum("Status: Done" in b for b in bodies) == 1
    assert sum("was already received for project spring" in b for b in bodies) == 1


@pytest.mark.asyncio
async def test_swaks_client(running: Running, tmp_path: Path) -> None:
    """The swaks command-line client delivers a fixture the same way."""
    swaks = shutil.which("swaks")
    assert swaks, "swaks is needed (Debian package swaks)"
    eml = tmp_path / "m.eml"
    eml.write_bytes(good_mail(name=f"acme_spring_{T}_07"))
    result = await asyncio.to_thread(
        subprocess.run,
        [swaks, "--server", f"127.0.0.1:{running.port}", "--from", SENDER, "--to", INBOUND,
         "--data", f"@{eml}", "--silent", "2"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert reply_zip((await running.sink.wait_to(SENDER))[0])


@pytest.mark.asyncio
async def test_reply_arrives_once_after_a_kill(tmp_path: Path, sink: Sink,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """250 said, then the service dies before replying: after restart the reply arrives,
    exactly once, and a further restart sends nothing more."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    r = await start(tmp_path, sink)
    # Spooled and acknowledged, but the work never starts: the process "dies" here.
    r.gateway.handler.on_accepted = lambda entry: None
    await r.send(good_mail())
    assert len(r.spooled()) == 1
    await r.shutdown()
    assert sink.messages == []
    assert len(r.spooled()) == 1, "still in the spool after the kill"
    r2 = await start(tmp_path, sink, data_dir=r.data_dir)
    await sink.wait_to(SENDER)
    await r2.shutdown()
    r3 = await start(tmp_path, sink, data_dir=r.data_dir)
    await drained(r3.gateway)
    await r3.shutdown()
    assert len(sink.to(SENDER)) == 1
    assert r3.spooled() == []


@pytest.mark.asyncio
async def test_starttls_required(tmp_path: Path, sink: Sink,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With require_starttls, plain MAIL is refused (530); after STARTTLS mail is taken."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    cert, key = self_signed(tmp_path)
    r = await start(tmp_path, sink, tls_cert=str(cert), tls_key=str(key),
                    require_starttls=True)
    try:
        plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=r.port, start_tls=False)
        await plain.connect()
        await plain.ehlo()
        assert "starttls" in plain.esmtp_extensions
        response = await plain.execute_command(f"MAIL FROM:<{SENDER}>".encode())
        assert response.code == 530
        await plain.quit()
        await aiosmtplib.send(good_mail(), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=r.port, start_tls=True,
                              validate_certs=False)
        assert reply_zip((await sink.wait_to(SENDER))[0])
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_connection_limits_and_idle_timeout(tmp_path: Path, sink: Sink,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond max_connections_per_ip a new session is refused with 421 4.7.0 and closed
    (and counted); a closed one frees its place; a session that sends nothing is closed
    after timeout_seconds."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    r = await start(tmp_path, sink, max_connections_per_ip=2, timeout_seconds=1)
    try:
        async def open_session() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            return reader, writer, await asyncio.wait_for(reader.readline(), 10)
        first, second = await open_session(), await open_session()
        assert first[2].startswith(b"220") and second[2].startswith(b"220")
        reader, writer, line = await open_session()
        assert line == b"421 4.7.0 Too many connections, try again later\r\n"
        assert await asyncio.wait_for(reader.read(), 10) == b"", "closed after the 421"
        writer.close()
        await writer.wait_closed()
        assert r.gateway.handler.outcomes["refused-too-many"] == 1
        first[1].close()
        await first[1].wait_closed()
        await asyncio.sleep(0)  # the server sees the close on its next turn
        for _ in range(100):
            reader, writer, line = await open_session()
            writer.close()
            await writer.wait_closed()
            if line.startswith(b"220"):
                break
            await asyncio.sleep(0.05)
        assert line.startswith(b"220"), "a closed session frees its place"
        # The second session never sent a command: closed by the idle timeout.
        rest = await asyncio.wait_for(second[0].read(), 10)
        assert rest.startswith(b"421 4.4.2"), rest
        second[1].close()
        await second[1].wait_closed()
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_data_streams_to_the_spool_byte_exact(tmp_path: Path, sink: Sink,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A message several times the write piece, with dot-stuffed lines, lands in the
    spool exactly as sent; a session that drops mid-DATA leaves nothing behind."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    config = parse_config(mail_config(sink.port))
    gateway = build_gateway(config, "usa", data_dir=tmp_path / "state")
    server = await start_smtp(gateway.handler, config.regions["usa"].smtp)  # no worker
    port = server.sockets[0].getsockname()[1]
    try:
        body = "".join(f".line {i} starts with a dot\r\n..two dots {i}\r\n" for i in range(30_000))
        raw = (f"From: {SENDER}\r\nTo: {INBOUND}\r\nSubject: big\r\n"
               "Message-ID: <stream@acme.example>\r\n\r\n" + body).encode()
        assert len(raw) > 4 * FLUSH_BYTES
        await aiosmtplib.send(raw, sender=SENDER, recipients=[INBOUND], hostname="127.0.0.1",
                              port=port, start_tls=False)
        (entry,) = gateway.spool.pending()
        assert entry.raw == raw

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for line in (b"EHLO x", f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{INBOUND}>".encode(),
                     b"DATA"):
            await reader.readuntil(b"\r\n")
            writer.write(line + b"\r\n")
        while not (await reader.readline()).startswith(b"354"):
            pass
        writer.write(raw[: 3 * FLUSH_BYTES])
        await writer.drain()
        writer.close()  # gone mid-DATA
        tmp = own(tmp_path / "state" / "spool" / "tmp")
        await eventually(lambda: not any(tmp.iterdir()), "the cut-off message's file gone",
                         timeout=5)
        assert len(gateway.spool.pending()) == 1
    finally:
        server.close()
        await server.wait_closed()
        gateway.region.close()


def test_the_aiosmtpd_internals_smtp_data_relies_on_are_still_there() -> None:
    """LimitedSMTP.smtp_DATA streams DATA to disk with aiosmtpd's private names; an
    aiosmtpd release that renames them must fail here, loudly, not in production."""
    needed = {"_set_post_data_state": callable(getattr(SMTP, "_set_post_data_state", None)),
              "_timeout_cb": callable(getattr(SMTP, "_timeout_cb", None)),
              "self._reader": "self._reader = reader" in inspect.getsource(SMTP)}
    missing = [name for name, ok in needed.items() if not ok]
    assert not missing, (
        f"aiosmtpd {aiosmtpd_version} no longer has {', '.join(missing)}: compare "
        "purlgate.channels.smtp_listener.LimitedSMTP.smtp_DATA with its new smtp_DATA, "
        "then widen the aiosmtpd bound in pyproject.toml and constraints.txt")
    assert aiosmtpd_version.startswith("1.4."), "a new aiosmtpd minor: review smtp_DATA"
