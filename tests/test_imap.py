"""The IMAP poller against a real Dovecot; messages placed with IMAP APPEND."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio

from purlgate.app import Gateway, build_gateway, serve
from purlgate.channels.imap_poller import ImapPoller
from purlgate.channels.spool import Spool
from purlgate.config import ImapConfig, SecretRef, parse_config
from purlgate.errors import ConfigError
from tests.dovecot import Dovecot, dovecot, free_port  # noqa: F401 - dovecot is a fixture
from tests.mail_helpers import (
    PASSWORD,
    SENDER,
    Sink,
    aes_zip,
    client_mail,
    drained,
    mail_config,
    rows,
)
from tests.waiting import eventually

T = "20261127_101500"


def mail(msgid: str, sender: str = SENDER, name: str = f"acme_spring_{T}_00") -> bytes:
    return client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": rows()}), "application/zip")],
                       sender=sender, msgid=msgid)


@pytest.fixture
def account(dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:  # noqa: F811
    user, password = dovecot.add_user()
    monkeypatch.setenv("PG_TEST_IMAP_PW", password)
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    return user, password


def imap_config(dovecot: Dovecot, user: str, **kw: object) -> ImapConfig:  # noqa: F811
    return ImapConfig(host="127.0.0.1", port=dovecot.port, tls="none", user=user,
                      password=SecretRef(env="PG_TEST_IMAP_PW"), poll_seconds=0.3, **kw)


def test_poll_spools_then_moves_without_marking_seen(
        dovecot: Dovecot, account: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A client's message is spooled, then moved to Processed, never flagged \\Seen;
    an unknown sender's goes to Rejected and is not spooled."""
    user, password = account
    dovecot.append(user, password, mail("<i1@acme.example>"))
    dovecot.append(user, password, mail("<i2@evil.example>", sender="mallory@evil.example"))
    spool = Spool(tmp_path / "spool")
    accepted = []
    config = parse_config(mail_config(25, max_bytes=1))
    poller = ImapPoller(imap_config(dovecot, user), inbound=["sftp-usa@idomoo.com"],
                        clients=config.clients, spool=spool, on_accepted=accepted.append)
    box = poller._connect()
    try:
        assert poller.poll_once(box) == 1
    finally:
        box.logout()
    assert len(spool.pending()) == 1 and accepted[0].meta["mail_from"] == SENDER
    assert accepted[0].meta["channel"] == "imap"
    assert dovecot.uids(user, password, "INBOX") == []
    assert len(dovecot.uids(user, password, "Processed")) == 1
    assert len(dovecot.uids(user, password, "Rejected")) == 1
    assert all(b"\\Seen" not in f for f in dovecot.flags(user, password, "Processed"))


def test_crash_between_spool_and_move(dovecot: Dovecot, account: tuple[str, str],  # noqa: F811
                                      tmp_path: Path) -> None:
    """If the move fails after spooling, the message stays and is spooled again next poll
    (the worker's ledger then answers it once): nothing is lost."""
    user, password = account
    dovecot.append(user, password, mail("<c1@acme.example>"))
    spool = Spool(tmp_path / "spool")
    config = parse_config(mail_config(25, max_bytes=1))
    poller = ImapPoller(imap_config(dovecot, user), inbound=["sftp-usa@idomoo.com"],
                        clients=config.clients, spool=spool, on_accepted=lambda e: None)
    box = poller._connect()
    def link_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("link down")

    box.move = link_down
    with pytest.raises(ConnectionError):
        poller.poll_once(box)
    box.logout()
    assert len(spool.pending()) == 1
    assert len(dovecot.uids(user, password, "INBOX")) == 1, "not lost"
    box = poller._connect()
    try:
        poller.poll_once(box)
    finally:
        box.logout()
    assert len(spool.pending()) == 2
    assert dovecot.uids(user, password, "INBOX") == []


@pytest_asyncio.fixture
async def imap_gateway(dovecot: Dovecot, account: tuple[str, str],  # noqa: F811
                       tmp_path: Path) -> AsyncIterator[tuple[Gateway, Sink]]:
    user, _ = account
    sink = await Sink().start()
    text = mail_config(sink.port)
    text += (f'\n[regions.usa.imap]\nhost = "127.0.0.1"\nport = {dovecot.port}\n'
             f'tls = "none"\nuser = "{user}"\npassword = {{ env = "PG_TEST_IMAP_PW" }}\n'
             "poll_seconds = 0.3\n")
    gateway = build_gateway(parse_config(text), "usa", data_dir=tmp_path / "state")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop))
    yield gateway, sink
    stop.set()
    await asyncio.wait_for(task, 60)
    await sink.stop()


@pytest.mark.asyncio
async def test_imap_message_gets_a_reply(imap_gateway: tuple[Gateway, Sink], dovecot: Dovecot,  # noqa: F811
                                         account: tuple[str, str]) -> None:
    """Through serve: a message placed in the mailbox is answered like an SMTP one."""
    _, sink = imap_gateway
    user, password = account
    await asyncio.to_thread(dovecot.append, user, password, mail("<srv@acme.example>"))
    replies = await sink.wait_to(SENDER, timeout=30)
    assert replies[0].message["In-Reply-To"] == "<srv@acme.example>"
    assert list(replies[0].message.iter_attachments())


@pytest.mark.asyncio
async def test_same_message_by_smtp_and_imap_once(imap_gateway: tuple[Gateway, Sink],
                                                  dovecot: Dovecot,  # noqa: F811
                                                  account: tuple[str, str]) -> None:
    """Delivered by SMTP and found again by IMAP: one batch, one reply."""
    gateway, sink = imap_gateway
    user, password = account
    raw = mail("<both@acme.example>")
    while gateway.smtp is None:
        await asyncio.sleep(0.05)
    await aiosmtplib.send(raw, sender=SENDER, recipients=["sftp-usa@idomoo.com"],
                          hostname="127.0.0.1", port=gateway.smtp_port, start_tls=False)
    await sink.wait_to(SENDER)
    await asyncio.to_thread(dovecot.append, user, password, raw)
    await eventually(lambda: asyncio.to_thread(dovecot.uids, user, password, "Processed"),
                     "the IMAP copy moved to Processed", timeout=6, every=0.1)
    await drained(gateway)
    assert len(sink.to(SENDER)) == 1
    assert len(gateway.region.store.recent()) == 1


def test_unreachable_server_is_retried_not_fatal(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No server on the port: the poller keeps retrying and stops cleanly when asked."""
    monkeypatch.setenv("PG_TEST_IMAP_PW", "x")
    config = ImapConfig(host="127.0.0.1", port=free_port(), tls="none", user="u",
                        password=SecretRef(env="PG_TEST_IMAP_PW"))
    poller = ImapPoller(config, inbound=["sftp-usa@idomoo.com"], clients={},
                        spool=Spool(tmp_path / "spool"), on_accepted=lambda e: None)
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    stop.wait(1.5)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert not poller.connected.is_set()


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_tls_modes_verify_the_server(dovecot: Dovecot, account: tuple[str, str],  # noqa: F811
                                     tmp_path: Path, mode: str) -> None:
    """Implicit TLS and STARTTLS both work with the configured CA, and both refuse a
    server whose certificate the CA does not vouch for."""
    user, password = account
    dovecot.append(user, password, mail(f"<tls-{mode}@acme.example>"))
    port = dovecot.tls_port if mode == "ssl" else dovecot.port
    config = parse_config(mail_config(25, max_bytes=1))
    trusted = ImapConfig(host="127.0.0.1", port=port, tls=mode, ca_file=dovecot.cert,
                         user=user, password=SecretRef(env="PG_TEST_IMAP_PW"))
    spool = Spool(tmp_path / "spool")
    poller = ImapPoller(trusted, inbound=["sftp-usa@idomoo.com"], clients=config.clients,
                        spool=spool, on_accepted=lambda e: None)
    box = poller._connect()
    try:
        assert poller.poll_once(box) == 1
    finally:
        box.logout()
    untrusted = ImapPoller(trusted.model_copy(update={"ca_file": None}),
                           inbound=["sftp-usa@idomoo.com"], clients=config.clients,
                           spool=spool, on_accepted=lambda e: None)
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted._connect()


async def start_imap_gateway(dovecot: Dovecot, user: str, tmp_path: Path,  # noqa: F811
                             sink: Sink, *, poll: float) -> tuple[Gateway, asyncio.Event,
                                                                  asyncio.Task[None]]:
    text = mail_config(sink.port)
    text += (f'\n[regions.usa.imap]\nhost = "127.0.0.1"\nport = {dovecot.port}\n'
             f'tls = "none"\nuser = "{user}"\npassword = {{ env = "PG_TEST_IMAP_PW" }}\n'
             f"poll_seconds = {poll}\n")
    gateway = build_gateway(parse_config(text), "usa", data_dir=tmp_path / "state")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop))
    assert gateway.imap is not None
    await asyncio.to_thread(gateway.imap.connected.wait, 30)
    return gateway, stop, task


@pytest.mark.asyncio
async def test_idle_answers_in_seconds_not_at_the_next_poll(
        dovecot: Dovecot, account: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The capabilities are read after login, so IDLE (and MOVE) are seen: with polling
    every 60 s, a message appended is answered within a few seconds."""
    user, password = account
    sink = await Sink().start()
    gateway, stop, task = await start_imap_gateway(dovecot, user, tmp_path, sink, poll=60)
    try:
        assert gateway.imap is not None
        assert {"IDLE", "MOVE"} <= gateway.imap.capabilities
        start = asyncio.get_running_loop().time()
        await asyncio.to_thread(dovecot.append, user, password, mail("<idle@acme.example>"))
        await sink.wait_to(SENDER, timeout=20)
        assert asyncio.get_running_loop().time() - start < 5
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sink.stop()


@pytest.mark.asyncio
async def test_a_restarted_server_is_reconnected_and_read(
        dovecot: Dovecot, account: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """Dovecot stops and starts again under the poller: it reconnects by itself and the
    next message is answered."""
    user, password = account
    sink = await Sink().start()
    gateway, stop, task = await start_imap_gateway(dovecot, user, tmp_path, sink, poll=0.5)
    try:
        assert gateway.imap is not None
        await asyncio.to_thread(dovecot.restart)
        await asyncio.to_thread(dovecot.append, user, password, mail("<again@acme.example>"))
        await sink.wait_to(SENDER, timeout=60)
        assert gateway.imap.connected.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sink.stop()


@pytest.mark.asyncio
async def test_a_refused_login_stops_the_start_with_a_clear_error(
        dovecot: Dovecot, account: tuple[str, str], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong IMAP password is not retried for ever in silence: serve does not start,
    and the error names the server and what to check."""
    user, _ = account
    monkeypatch.setenv("PG_TEST_IMAP_PW", "not-the-password")
    text = mail_config(25)
    text += (f'\n[regions.usa.imap]\nhost = "127.0.0.1"\nport = {dovecot.port}\n'
             f'tls = "none"\nuser = "{user}"\npassword = {{ env = "PG_TEST_IMAP_PW" }}\n')
    gateway = build_gateway(parse_config(text), "usa", data_dir=tmp_path / "state")
    with pytest.raises(ConfigError) as err:
        await asyncio.wait_for(serve(gateway, asyncio.Event()), 30)
    assert err.value.message == (
        f"IMAP 127.0.0.1:{dovecot.port}: the server refused the login of {user!r}: check "
        "imap.user and imap.password")
