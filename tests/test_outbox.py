"""The outbox: nothing queued is lost; retries keep the Message-ID; 5xx and expiry alert."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import threading
import time
from collections.abc import Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

import purlgate.channels.outbox as outbox_module
import purlgate.core.files as files_module
from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.outbox import Outbox
from purlgate.channels.outbox_files import write_message
from purlgate.channels.relay import relay_sender
from purlgate.channels.relay_data import Outgoing
from purlgate.channels.replies import PLACEHOLDER, attach
from purlgate.config import RelayConfig, SecretRef
from purlgate.errors import PermanentDeliveryError, TemporaryDeliveryError
from tests.mail_helpers import RELAY, Clock, Sink, note, outgoing
from tests.tls_helpers import self_signed
from tests.waiting import eventually


class Script:
    """A sender that fails as told, then succeeds; records what it was given."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.sent: list[tuple[bytes, str, list[str]]] = []

    async def __call__(self, message: Outgoing, sender: str, recipients: Sequence[str]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((message.read(), sender, list(recipients)))


def test_retries_with_growing_delays_and_the_same_message_id(tmp_path: Path) -> None:
    """Two 4xx-like failures, then success: delays 60 s then 120 s; one Message-ID."""
    clock, script = Clock(), Script(TemporaryDeliveryError("451"), TemporaryDeliveryError("421"))
    box = Outbox(tmp_path, RELAY, sender=script, clock=clock)
    box.enqueue(note(), sender="sftp-usa@idomoo.com", recipients=["a@acme.example"], key="r1")
    assert asyncio.run(box.deliver_due()) == pytest.approx(60)
    clock.now += 59
    assert asyncio.run(box.deliver_due()) == pytest.approx(1)  # not due yet: no attempt
    clock.now += 1
    assert asyncio.run(box.deliver_due()) == pytest.approx(120)
    clock.now += 120
    assert asyncio.run(box.deliver_due()) is None
    assert len(script.sent) == 1
    assert box.items() == []
    assert sorted(p.name for p in (tmp_path / "sent").iterdir()) == ["r1.msg"]
    assert list((tmp_path / "queue").iterdir()) == [], "its attempts state went with it"


def test_queued_mail_survives_a_restart(tmp_path: Path) -> None:
    """A new Outbox on the same folder delivers what the old one had queued, same bytes."""
    clock = Clock()
    first = Outbox(tmp_path, RELAY, sender=Script(TemporaryDeliveryError("down")), clock=clock)
    first.enqueue(note(), sender="s@idomoo.com", recipients=["a@acme.example"], key="r1")
    asyncio.run(first.deliver_due())
    queued = (tmp_path / "queue" / "r1.msg").read_bytes().split(b"\n", 1)[1]
    assert json.loads((tmp_path / "queue" / "r1.state").read_text())["attempts"] == 1
    script = Script()
    clock.now += 3600 - 1
    asyncio.run(Outbox(tmp_path, RELAY, sender=script, clock=clock).deliver_due())
    assert script.sent[0][0] == queued


def test_same_key_is_queued_once(tmp_path: Path) -> None:
    """Enqueueing a key again (a restarted worker) does nothing, even after delivery."""
    script = Script()
    box = Outbox(tmp_path, RELAY, sender=script, clock=Clock())
    assert box.enqueue(note(), sender="s@idomoo.com", recipients=["a@x.example"], key="r1")
    assert not box.enqueue(note(), sender="s@idomoo.com", recipients=["a@x.example"], key="r1")
    asyncio.run(box.deliver_due())
    assert not box.enqueue(note(), sender="s@idomoo.com", recipients=["a@x.example"], key="r1")
    asyncio.run(box.deliver_due())
    assert len(script.sent) == 1


def alerting(box: Outbox) -> Outbox:
    """The outbox as serve wires it: a message that fails alerts the operator."""
    box.on_failed = OperatorAlerts(box, sender="sftp-usa@idomoo.com",
                                   operator=RELAY.operator).undeliverable
    return box


def test_permanent_failure_stops_and_alerts_the_operator(tmp_path: Path) -> None:
    """A 5xx stops retrying at once and queues an alert to the operator address."""
    script = Script(PermanentDeliveryError("550"))
    box = alerting(Outbox(tmp_path, RELAY, sender=script, clock=Clock()))
    box.enqueue(note(), sender="s@idomoo.com", recipients=["gone@acme.example"], key="r1")
    asyncio.run(box.deliver_due())
    asyncio.run(box.deliver_due())
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["r1.msg", "r1.state"]
    assert [r for _, _, r in script.sent] == [["ops@idomoo.example"]]
    assert b"undeliverable message r1 (refused)" in script.sent[0][0]


def test_expiry_stops_and_alerts(tmp_path: Path) -> None:
    """Temporary failures past the expiry (2 days by default) stop and alert."""
    clock = Clock()
    script = Script(*[TemporaryDeliveryError("down")] * 20)
    box = alerting(Outbox(tmp_path, RELAY, sender=script, clock=clock))
    box.enqueue(note(), sender="s@idomoo.com", recipients=["a@acme.example"], key="r1")
    for _ in range(12):
        asyncio.run(box.deliver_due())
        clock.now += 600
    assert (tmp_path / "failed" / "r1.msg").exists()
    assert (tmp_path / "queue" / "alert-r1.msg").exists() or \
        (tmp_path / "sent" / "alert-r1.msg").exists()


@pytest.mark.asyncio
async def test_relay_down_then_up(tmp_path: Path) -> None:
    """Against a real relay: refused connection is retried; once it listens, delivered."""
    sink = await Sink().start()
    port = sink.port
    await sink.stop()  # the relay is down
    relay = RelayConfig(host="127.0.0.1", port=port, retry_first_seconds=0.2,
                        retry_max_seconds=0.5, timeout_seconds=5)
    box = Outbox(tmp_path, relay, sender=relay_sender(relay))
    box.enqueue(note("retry me"), sender="s@idomoo.com", recipients=["a@acme.example"], key="r1")
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stop))
    items = await eventually(lambda: [i for i in box.items() if i.meta["attempts"] >= 1],
                             "a first attempt on the relay that is down")
    assert (tmp_path / "queue" / "r1.msg").exists()
    meta = items[0].meta
    assert meta["attempts"] >= 1 and "unreachable" in meta["last_error"]
    up = await Sink().start(port)
    await up.wait_for(1, timeout=10)
    stop.set()
    await task
    await up.stop()
    assert up.messages[0].message["Subject"] == "retry me"
    assert box.items() == []


class AuthSink(Sink):
    """A relay that insists on STARTTLS and AUTH, as real submission servers do."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.logins: list[str] = []

    def authenticate(self, server: object, session: object, envelope: object, mechanism: str,
                     auth_data: object) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"relay-secret"
        if ok:
            assert isinstance(auth_data, LoginPassword)
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)  # let aiosmtpd send 235 or 535

    async def start(self) -> AuthSink:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.session(tls_context=self.context, require_starttls=True,
                                 authenticator=self.authenticate, auth_required=True),
            "127.0.0.1", 0)
        return self


@pytest.mark.asyncio
async def test_relay_with_starttls_and_auth(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """STARTTLS verified against the configured CA, then AUTH: delivered; an untrusted
    certificate is not; wrong credentials are a permanent failure (and alert)."""
    cert, key = self_signed(tmp_path)
    sink = await AuthSink(cert, key).start()
    monkeypatch.setenv("PG_TEST_RELAY_PW", "relay-secret")
    relay = RelayConfig(host="127.0.0.1", port=sink.port, starttls=True, ca_file=cert,
                        username="purlgate", password=SecretRef(env="PG_TEST_RELAY_PW"),
                        timeout_seconds=10)
    wire = outgoing(tmp_path / "m.msg", note().as_bytes(policy=policy.SMTP))
    senders = []
    try:
        senders.append(relay_sender(relay))
        await senders[-1](wire, "s@idomoo.com", ["a@acme.example"])
        await senders[-1](wire, "s@idomoo.com", ["a@acme.example"])
        assert sink.logins == ["purlgate"]  # the second went over the kept connection
        assert len(sink.messages) == 2 and len(sink.sessions) == 1
        untrusted = relay.model_copy(update={"ca_file": None})
        senders.append(relay_sender(untrusted))
        with pytest.raises(TemporaryDeliveryError):
            await senders[-1](wire, "s@idomoo.com", ["a@acme.example"])
        monkeypatch.setenv("PG_TEST_RELAY_PW", "wrong")
        senders.append(relay_sender(relay))
        with pytest.raises(PermanentDeliveryError):
            await senders[-1](wire, "s@idomoo.com", ["a@acme.example"])
        assert len(sink.messages) == 2
    finally:
        for sender in senders:
            await sender.close()
        await sink.stop()


class QuitCounting(Sink):
    quits = 0

    async def handle_QUIT(self, server: object, session: object,
                          envelope: object) -> str:
        self.quits += 1
        return "221 Bye"


@pytest.mark.asyncio
async def test_relay_connections_are_kept_checked_and_closed(tmp_path: Path) -> None:
    """As Postfix's connection cache: the next message goes over the kept connection
    (one per message in flight); a connection the relay cut meanwhile costs a new
    connection, never the message; unused for ``keep_connections_seconds``, it is
    closed with QUIT; with 0, each message has its own connection."""
    sink = await QuitCounting().start()
    relay = RelayConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5,
                        keep_connections_seconds=0.5)
    send = relay_sender(relay)
    wire = [outgoing(tmp_path / f"{i}.msg", note(f"n{i}").as_bytes(policy=policy.SMTP))
            for i in range(8)]
    try:
        for raw in wire[:3]:
            await send(raw, "s@idomoo.com", ["a@acme.example"])
        assert len(sink.messages) == 3 and len(sink.sessions) == 1
        await asyncio.gather(*(send(raw, "s@idomoo.com", ["a@acme.example"])
                               for raw in wire[3:5]))
        assert len(sink.messages) == 5 and len(sink.sessions) == 2
        for smtp in sink.sessions:  # the relay ends idle sessions (its own timeout)
            assert smtp.transport is not None
            smtp.transport.close()
        await send(wire[5], "s@idomoo.com", ["a@acme.example"])
        subjects = [m.message["Subject"] for m in sink.messages]
        # Each once; the two sent at once in either order.
        assert subjects[:3] + sorted(subjects[3:5]) + subjects[5:] == [f"n{i}" for i in range(6)]
        assert len(sink.sessions) == 3
        await eventually(lambda: sink.open_sessions == 0, "idle past 0.5 s: QUIT")
        assert sink.quits == 1
        once = relay_sender(relay.model_copy(update={"keep_connections_seconds": 0}))
        for raw in wire[6:]:
            await once(raw, "s@idomoo.com", ["a@acme.example"])
        await eventually(lambda: sink.quits == 3, "each one-message connection QUIT")
        assert len(sink.sessions) == 5 and sink.open_sessions == 0
    finally:
        await send.close()
        await sink.stop()


def test_whatever_a_crash_left_enqueue_adopts_and_sent_is_never_sent_again(
        tmp_path: Path) -> None:
    """A half-written entry (its hidden .part, a crash before the rename) is replaced by
    the next enqueue of that key, which succeeds (one of a key never queued again goes
    once it is old); an entry recorded sent whose attempts state is still in the queue
    (a crash between the two) is not sent again, and the state goes once it is old."""
    clock, script = Clock(), Script()
    clock.now = time.time()  # the injected clock is the one files' ages are read against
    box = Outbox(tmp_path, RELAY, sender=script, clock=clock)
    (tmp_path / "queue" / ".r1.msg.part").write_bytes(b"half a message")
    (tmp_path / "queue" / ".alert-x.msg.part").write_bytes(b"half an alert")
    assert box.items() == []
    assert box.enqueue(note(), sender="sftp-usa@idomoo.com", recipients=["a@acme.example"],
                       key="r1")
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == [
        ".alert-x.msg.part", "r1.msg"]
    assert b"Subject: hello" in (tmp_path / "queue" / "r1.msg").read_bytes()
    box.enqueue(note("second"), sender="sftp-usa@idomoo.com", recipients=["b@acme.example"],
                key="r2")
    (tmp_path / "queue" / "r2.state").write_text('{"attempts": 1}')
    (tmp_path / "queue" / "r2.msg").replace(tmp_path / "sent" / "r2.msg")
    assert [item.id for item in box.items()] == ["r1"]
    assert (tmp_path / "queue" / "r2.state").exists(), "young: perhaps a requeue"
    old = time.time() - 3600
    for left in ("r2.state", ".alert-x.msg.part"):
        os.utime(tmp_path / "queue" / left, (old, old))
    asyncio.run(box.deliver_due())
    assert [r for _, _, r in script.sent] == [["a@acme.example"]]
    assert list((tmp_path / "queue").iterdir()) == [], "what the crashes left is gone"
    assert not box.enqueue(note("second"), sender="sftp-usa@idomoo.com",
                           recipients=["b@acme.example"], key="r2"), "sent: never again"
    assert sorted(p.name for p in (tmp_path / "sent").iterdir()) == ["r1.msg", "r2.msg"]


def test_the_previous_release_s_outbox_is_converted_and_kept(tmp_path: Path) -> None:
    """A data directory of the previous release (``.eml`` + ``.json`` per message, the
    .json the commit point): a queued entry is sent byte for byte with its attempts
    kept, a failed one is listed and can be sent again, a sent record still refuses its
    key, a body without its .json (never committed) goes."""
    eml = note("old queued").as_bytes(policy=policy.SMTP)
    queue, sent, failed = (tmp_path / f for f in ("queue", "sent", "failed"))
    for folder in (queue, sent, failed):
        folder.mkdir(parents=True)
    meta = {"sender": "s@idomoo.com", "recipients": ["a@acme.example"], "attempts": 2,
            "created_at": 1_000_000.0, "next_at": 1_000_000.0, "last_error": "451",
            "alert": True}
    (queue / "q1.eml").write_bytes(eml)
    (queue / "q1.json").write_text(json.dumps(meta))
    (failed / "f1.eml").write_bytes(note("old failed").as_bytes(policy=policy.SMTP))
    (failed / "f1.json").write_text(json.dumps({**meta, "last_error": "relay answered 550"}))
    (sent / "s1.eml").write_bytes(b"x")
    (sent / "s1.json").write_text(json.dumps({**meta, "delivered_at": 1_000_000.0}))
    (queue / "u1.eml").write_bytes(b"half")
    script = Script()
    box = Outbox(tmp_path, RELAY, sender=script, clock=Clock())
    [item] = box.items()
    assert (item.id, item.meta["attempts"], item.meta["last_error"]) == ("q1", 2, "451")
    assert sorted(p.name for p in queue.iterdir()) == ["q1.msg", "q1.state"]
    [dead] = box.failed_items()
    assert (dead.id, dead.meta["last_error"]) == ("f1", "relay answered 550")
    assert not box.enqueue(note(), sender="s@idomoo.com", recipients=["a@x.example"],
                           key="s1"), "sent in the old layout: never again"
    asyncio.run(box.deliver_due())
    assert script.sent == [(eml, "s@idomoo.com", ["a@acme.example"])]
    box.requeue("f1")
    asyncio.run(box.deliver_due())
    assert [b"old failed" in raw for raw, _, _ in script.sent] == [False, True]
    assert box.items() == [] and box.failed_items() == []


def test_sent_mail_is_swept_by_when_it_was_sent(tmp_path: Path) -> None:
    """Sent records older than the retention go (their ZIPs hold client data); newer
    ones stay."""
    clock = Clock()
    clock.now = time.time()
    box = Outbox(tmp_path, RELAY, sender=Script(), clock=clock)
    box.enqueue(note(), sender="s@idomoo.com", recipients=["a@acme.example"], key="r1")
    asyncio.run(box.deliver_due())
    clock.now += 29 * 86400
    assert box.sweep_sent(30 * 86400) == 0
    clock.now += 2 * 86400
    assert box.sweep_sent(30 * 86400) == 1
    assert list((tmp_path / "sent").iterdir()) == []


def test_a_reply_s_zip_is_written_from_disk_in_its_place(tmp_path: Path) -> None:
    """The outbox streams a reply's ZIP from its file into the stored message: decoded,
    it is the file byte for byte (a Subject that copies the placeholder changes nothing),
    and the message parses as one text part and one attachment."""
    payload = tmp_path / "reply.zip"
    payload.write_bytes(os.urandom(1_000_003))
    message = EmailMessage()
    message["From"], message["To"] = "sftp-usa@idomoo.com", "a@acme.example"
    message["Subject"] = "Re: " + base64.b64encode(PLACEHOLDER).decode()
    message.set_content("Your data file was processed.")
    message.add_attachment(PLACEHOLDER, maintype="application", subtype="zip",
                           filename="PURL_x.zip")
    stored = tmp_path / "m.eml"
    with stored.open("wb") as out:
        write_message(out, message, payload)
    raw = stored.read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, as on the wire
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    parsed = message_from_bytes(raw, policy=policy.default)
    (part,) = list(parsed.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_filename() == "PURL_x.zip"
    assert part.get_payload(decode=True) == payload.read_bytes()
    assert str(parsed["Subject"]) == str(message["Subject"])


def test_one_commit_makes_a_message_s_answers_durable_with_one_folder_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``one_commit`` each entry's file is fsynced as it is queued and the queue
    folder once at the end (also when the block fails); outside, every enqueue fsyncs
    the folder itself. Other threads are not affected."""
    synced: list[str] = []
    real = files_module.fsync_dir

    def counting(path: Path) -> None:
        synced.append(f"{threading.current_thread().name}:{path.name}")
        real(path)

    monkeypatch.setattr(files_module, "fsync_dir", counting)
    monkeypatch.setattr(outbox_module, "fsync_dir", counting)
    box = Outbox(tmp_path, RELAY, sender=Script(), clock=Clock())
    me = threading.current_thread().name
    with box.one_commit():
        for key in ("notify-1", "notify-2", "reply-1"):
            box.enqueue(note(key), sender="s@idomoo.com", recipients=["a@x.example"], key=key)
        other = threading.Thread(target=box.enqueue, args=(note("elsewhere"),),
                                 kwargs={"sender": "s@idomoo.com",
                                         "recipients": ["a@x.example"], "key": "other"},
                                 name="other")
        other.start()
        other.join()
        assert synced == ["other:queue"], "the other thread commits its own"
    assert synced == ["other:queue", f"{me}:queue"]
    with pytest.raises(RuntimeError), box.one_commit():
        box.enqueue(note("x"), sender="s@idomoo.com", recipients=["a@x.example"], key="x")
        raise RuntimeError("the batch failed after queueing")
    assert synced[-1] == f"{me}:queue"
    box.enqueue(note("y"), sender="s@idomoo.com", recipients=["a@x.example"], key="y")
    assert len(synced) == 4
    assert sorted(i.id for i in box.items()) == ["notify-1", "notify-2", "other", "reply-1",
                                                "x", "y"]


@pytest.mark.asyncio
async def test_the_outbox_leaves_the_sender_it_was_handed_to_its_maker(tmp_path: Path) -> None:
    """A stopped outbox does not close the relay connections it was handed: whoever
    made them closes them (serve, after the outbox has stopped), with QUIT."""
    sink = await QuitCounting().start()
    relay = RelayConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5,
                        keep_connections_seconds=60)
    send = relay_sender(relay)
    box = Outbox(tmp_path, relay, sender=send)
    stop = asyncio.Event()
    running = asyncio.create_task(box.run(stop))
    try:
        box.enqueue(note(), sender="s@idomoo.com", recipients=["a@acme.example"], key="r1")
        await sink.wait_to("a@acme.example")
        stop.set()
        await running
        assert sink.open_sessions == 1 and sink.quits == 0, "still the maker's to close"
        await send.close()
        await eventually(lambda: sink.open_sessions == 0, "the maker closed it")
        assert sink.quits == 1
    finally:
        await send.close()
        await sink.stop()


def test_the_outbox_judges_ages_on_the_clock_it_is_given(tmp_path: Path) -> None:
    """A leftover hidden .part is judged old on the injected clock, not the system's."""
    clock = Clock()
    clock.now = time.time() + 3600  # an hour on
    box = Outbox(tmp_path, RELAY, sender=Script(), clock=clock)
    (tmp_path / "queue" / ".x.msg.part").write_bytes(b"half a message")
    assert box.items() == []
    assert not (tmp_path / "queue" / ".x.msg.part").exists()


class Overlap:
    """A relay that takes a while per message and notes how many it had at once."""

    def __init__(self) -> None:
        self.at_once = self.most_at_once = self.sent = 0

    async def __call__(self, message: Outgoing, sender: str, recipients: Sequence[str]) -> None:
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        await asyncio.sleep(0.05)  # the relay's time: others may start meanwhile
        self.at_once -= 1
        self.sent += 1


@pytest.mark.asyncio
async def test_deliveries_go_several_at_once_up_to_max_connections(tmp_path: Path) -> None:
    """Six replies of 700 kB with relay.max_connections = 3: three at a time, never
    more (each streams from its file, so big ones need not wait for memory)."""
    relay = RELAY.model_copy(update={"max_connections": 3})
    overlap = Overlap()
    box = Outbox(tmp_path, relay, sender=overlap)
    payload = tmp_path / "reply.bin"
    payload.write_bytes(os.urandom(700_000))
    for i in range(6):
        message = note(f"big {i}")
        attach(message, PLACEHOLDER, maintype="application", subtype="zip",
               filename="reply.zip")
        box.enqueue(message, sender="s@idomoo.com", recipients=["a@acme.example"],
                    key=f"big-{i}", attachment=payload)
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stop))
    await eventually(lambda: overlap.sent == 6, "the six replies sent")
    stop.set()
    await task
    assert overlap.most_at_once == 3
