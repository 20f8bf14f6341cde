"""Signed status webhooks, delivered to a real aiohttp receiver the tests start: the
signature checked by the Standard Webhooks library and by an independent HMAC, retries
after a 500 and a timeout with the same id, 410 stopping the endpoint, redirects, the
dead letter and its alert, and kill -9 of a real `purlgate serve` mid-delivery and
between a batch's end and its events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import pytest_asyncio
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.outbox import Outbox
from purlgate.channels.outbox_files import message_bytes
from purlgate.channels.relay_data import Outgoing
from purlgate.channels.webhook_post import check_secret
from purlgate.channels.webhooks import Webhooks, _Rounds
from purlgate.cli import main
from purlgate.config import Config, parse_config
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import Submission
from purlgate.core.validation import validate
from purlgate.errors import ConfigError
from tests.config_builder import region_toml
from tests.conftest import DATA, make_harness
from tests.dovecot import free_port
from tests.mail_helpers import INBOUND, RELAY, SENDER, Clock, Sink, good_mail, mail_config
from tests.serve_helpers import serve
from tests.waiting import eventually

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
T = "20261127_101500"


@dataclass
class Receiver:
    """An HTTP endpoint that records each request and answers from a script: a status,
    ("hang", seconds), or ("redirect", status, location); then 200."""

    script: list[Any] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # hangs end
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path_qs, dict(request.headers), body))
        self.arrived.set()
        action = self.script.pop(0) if self.script else 200
        if isinstance(action, tuple) and action[0] == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), action[1])
            return web.Response(status=200)
        if isinstance(action, tuple) and action[0] == "redirect":
            return web.Response(status=action[1], headers={"Location": action[2]})
        return web.Response(status=action, text="row data would never be echoed")

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _path, _headers, body in self.requests]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", found.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.port = runner.addresses[0][1]
    yield found
    found.released.set()
    await runner.cleanup()


def clients(port: int, **hook: object) -> str:
    extra = "".join(f", {k} = {json.dumps(v)}" for k, v in hook.items())
    return f"""[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data@acme.example"]
webhooks = [{{ url = "http://127.0.0.1:{port}/hooks/acme?token=s3cret-token", secret = {{ env = "PG_TEST_WEBHOOK" }}{extra} }}]

[clients.acme.projects.spring]

[clients.acme.projects.quiet]
"""


@dataclass
class Rig:
    config: Config
    hooks: Webhooks
    harness: Any
    clock: Clock
    outbox: Outbox

    def batch(self, name: str = f"ragged_{T}.csv", project: str = "spring") -> Any:
        return self.harness.fixture(name, project=project)

    def alerts(self) -> list[str]:
        """Each operator alert queued: its subject, then its text."""
        found = []
        for path in sorted(self.outbox.queue.glob("*.msg")):
            message = email.message_from_bytes(message_bytes(path), policy=email.policy.default)
            body = message.get_body(("plain",))
            assert body is not None
            found.append(f"{message['Subject']}\n{body.get_content()}")
        return found


@pytest.fixture
def rig(tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Rig:
    return make_rig(tmp_path, receiver, monkeypatch)


def make_rig(tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
             **hook: object) -> Rig:
    monkeypatch.setenv("PG_TEST_WEBHOOK", SECRET)
    text = region_toml(webhooks={"timeout_seconds": 0.5, "retry_first_seconds": 10,
                                 "expire_seconds": 3600}) + clients(receiver.port, **hook)
    (tmp_path / "regions.toml").write_text(text)
    config = parse_config(text)
    clock = Clock()
    outbox = Outbox(tmp_path / "state" / "outbox", RELAY, sender=_never)
    alerts = OperatorAlerts(outbox, sender="sftp-usa@idomoo.com", operator="ops@idomoo.example")
    hooks = Webhooks(tmp_path / "state" / "webhooks", config.region("usa").webhooks,
                     region="usa", clients=config.clients_of("usa"), alerts=alerts, clock=clock)
    harness = make_harness(config, tmp_path)
    harness.processor.subscribers.append(hooks)
    return Rig(config, hooks, harness, clock, outbox)


async def _never(message: Outgoing, sender: str, recipients: Any) -> None:
    raise AssertionError("alerts are only queued here")


def verified(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The body, once both verifiers accept its signature: the Standard Webhooks
    library, and the specification's HMAC computed here independently."""
    payload: dict[str, Any] = Webhook(SECRET).verify(body, headers)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    return payload


@pytest.mark.asyncio
async def test_a_batch_is_posted_signed_with_its_facts_and_never_its_rows(
        rig: Rig, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """Received, loaded and done with errors arrive in order, each verifiable with the
    Standard Webhooks library; the body has the batch's facts and both files' SHA-256,
    never a row's value or a link; the endpoint's path and query (a token) are in no log
    line; every delivery is recorded as sent."""
    caplog.set_level("DEBUG")
    outcome = rig.batch()
    await rig.hooks.deliver_due()
    payloads = [verified(h, b) for _p, h, b in receiver.requests]
    assert [p["type"] for p in payloads] == ["batch.received", "batch.loaded",
                                             "batch.done_with_errors"]
    assert len({h["webhook-id"] for _p, h, _b in receiver.requests}) == 3
    assert receiver.requests[0][0] == "/hooks/acme?token=s3cret-token"
    done = payloads[-1]["data"]
    source = DATA / f"ragged_{T}.csv"
    assert done["batch_id"] == outcome.batch.id and done["client"] == "acme"
    assert done["state"] == "Done with Errors" and done["validation"] is False
    assert done["rows"] == {"total": outcome.batch.counts.rows_total,
                            "ok": outcome.batch.counts.rows_ok,
                            "errors": outcome.batch.counts.rows_error}
    assert done["received_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert done["purl_file"] == {
        "name": outcome.purl.name,
        "sha256": hashlib.sha256(outcome.purl.read_bytes()).hexdigest()}
    assert done["error_file"] == outcome.errors.name
    raw = b"".join(body for _p, _h, body in receiver.requests).decode()
    cells = {c for line in source.read_text().splitlines()[1:] for c in line.split(",")
             if len(c) > 3}
    assert cells and not [c for c in cells if c in raw], "no row data"
    assert "https://purl.test" not in raw, "no links"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("purlgate"))
    assert "webhook" in ours and "s3cret-token" not in ours and "/hooks/acme" not in ours
    assert rig.hooks.entries() == [] and len(list(rig.hooks.sent.glob("*.json"))) == 3


@pytest.mark.asyncio
async def test_retried_after_a_500_and_a_timeout_with_the_same_id(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 500, then no answer within the attempt's time limit, then a 200: three
    attempts with doubling delays, one webhook-id, each signature valid at its own
    timestamp; the entry keeps what went wrong until it is delivered."""
    rig = make_rig(tmp_path, receiver, monkeypatch, events=["batch.done_with_errors"])
    receiver.script = [500, ("hang", 3), 200]
    rig.batch()
    await rig.hooks.deliver_due()
    [entry] = rig.hooks.entries()
    assert (entry.data["attempts"], entry.data["last_error"]) == (1, "answered 500")
    assert entry.due == rig.clock.now + 10
    await rig.hooks.deliver_due()
    assert len(receiver.requests) == 1, "not due yet"
    rig.clock.now += 10
    await rig.hooks.deliver_due()
    [entry] = rig.hooks.entries()
    assert (entry.data["attempts"], entry.data["last_error"]) == (
        2, "no answer within 0.5 s")
    assert entry.due == rig.clock.now + 20, "the delay doubles"
    rig.clock.now += 20
    await rig.hooks.deliver_due()
    assert rig.hooks.entries() == []
    ids = {h["webhook-id"] for _p, h, _b in receiver.requests}
    assert len(receiver.requests) == 3 and len(ids) == 1
    for _path, headers, body in receiver.requests:
        assert verified(headers, body)["type"] == "batch.done_with_errors"


@pytest.mark.asyncio
async def test_410_stops_the_endpoint_until_revived(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A 410 Gone dead-letters the event and stops the endpoint: the next event goes
    straight to failed/ without a request, and the operator is alerted once, with the
    command that brings it back; `purlgate webhooks --revive` and `--requeue all` then
    deliver both."""
    rig = make_rig(tmp_path, receiver, monkeypatch, events=["batch.done", "batch.failed"])
    receiver.script = [410]
    rig.batch(f"comma_{T}.csv")
    await rig.hooks.deliver_due()
    rig.harness.out = tmp_path / "out2"
    rig.harness.out.mkdir()
    rig.batch(f"comma_{T}.csv", project="quiet")  # the client's endpoint too
    await rig.hooks.deliver_due()
    assert len(receiver.requests) == 1, "nothing more is sent to a gone endpoint"
    first, second = sorted(rig.hooks.entries(rig.hooks.failed),
                           key=lambda e: e.data["attempts"], reverse=True)
    assert (first.data["why"], first.data["last_error"]) == ("gone", "answered 410")
    assert second.data["why"] == "gone" and second.data["attempts"] == 0
    assert second.data["last_error"].startswith("the endpoint answered 410 Gone at ")
    [alert] = rig.alerts()
    assert "webhook to http://127.0.0.1:" in alert and "gone in region usa" in alert
    assert "purlgate webhooks --region usa --revive URL" in alert
    assert "s3cret-token" not in alert
    url = f"http://127.0.0.1:{receiver.port}/hooks/acme?token=s3cret-token"
    config = ["--config", str(tmp_path / "regions.toml"), "--data-dir", str(tmp_path / "state")]
    assert main(["webhooks", *config]) == 0
    assert f"STOPPED: {url} answered 410 Gone" in capsys.readouterr().out
    assert main(["webhooks", *config, "--revive", url]) == 0
    assert main(["webhooks", *config, "--requeue", "all"]) == 0
    assert "2 delivery(ies) queued again" in capsys.readouterr().out
    rig.clock.now = time.time() + 1  # the command queued them due now, on the wall clock
    await rig.hooks.deliver_due()
    assert rig.hooks.entries() == [] and rig.hooks.entries(rig.hooks.failed) == []
    assert len(receiver.requests) == 3


@pytest.mark.asyncio
async def test_expired_deliveries_are_dead_lettered_with_an_alert(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that keeps answering 503 is retried until expire_seconds; then the
    event moves to failed/ and the operator gets one alert saying how to requeue it."""
    rig = make_rig(tmp_path, receiver, monkeypatch, events=["batch.done"])
    receiver.script = [503] * 50
    rig.batch(f"comma_{T}.csv")
    tries = 0
    while entries := rig.hooks.entries():
        rig.clock.now = entries[0].due
        await rig.hooks.deliver_due()
        tries += 1
        assert tries < 20
    [dead] = rig.hooks.entries(rig.hooks.failed)
    assert dead.data["why"] == "expired" and dead.data["last_error"] == "answered 503"
    assert dead.data["attempts"] == len(receiver.requests) > 2
    [alert] = rig.alerts()
    assert f"purlgate webhooks --region usa --requeue {dead.id}" in alert


@pytest.mark.asyncio
async def test_redirects_only_to_the_same_origin_and_keeping_the_method(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 307 to another path of the endpoint's origin is followed (signed again); a 307
    to another origin and a 302 are not: retried later, nothing sent elsewhere."""
    rig = make_rig(tmp_path, receiver, monkeypatch, events=["batch.done"])
    elsewhere = f"http://localhost:{receiver.port}/stolen"  # another origin, same server
    receiver.script = [("redirect", 307, "/moved"), 200]
    rig.batch(f"comma_{T}.csv")
    await rig.hooks.deliver_due()
    assert [p for p, _h, _b in receiver.requests] == ["/hooks/acme?token=s3cret-token",
                                                       "/moved"]
    verified(receiver.requests[1][1], receiver.requests[1][2])
    assert rig.hooks.entries() == []
    receiver.requests.clear()
    receiver.script = [("redirect", 307, elsewhere), ("redirect", 302, "/moved")]
    rig.harness.out = tmp_path / "out2"
    rig.harness.out.mkdir()
    rig.batch(f"comma_{T}.csv", project="quiet")
    await rig.hooks.deliver_due()
    [entry] = rig.hooks.entries()
    assert entry.data["last_error"] == (f"answered 307 to http://localhost:{receiver.port}:"
                                        " a redirect to another origin is not followed")
    rig.clock.now += 10
    await rig.hooks.deliver_due()
    [entry] = rig.hooks.entries()
    assert entry.data["last_error"] == ("answered 302: a redirect is followed only as a 307 "
                                        "or 308 to the same origin")
    assert [p for p, _h, _b in receiver.requests] == ["/hooks/acme?token=s3cret-token"] * 2


@pytest.mark.asyncio
async def test_a_validation_and_a_failed_batch_are_events_too(
        rig: Rig, receiver: Receiver) -> None:
    """validation.finished carries the check's outcome and no PURL file; batch.failed
    carries the error's code and summary."""
    source = DATA / f"comma_{T}.csv"
    validate(rig.harness.processor,
             Submission(path=source, received_name=source.name, channel="test",
                        client_id="acme", project_id="spring"), rig.harness.out)
    outcome = rig.harness.fixture("no_time_of_day.csv")
    assert outcome.state is BatchState.FAILED
    await rig.hooks.deliver_due()
    by_type = {p["type"]: p["data"] for p in receiver.bodies()}
    checked = by_type["validation.finished"]
    assert checked["validation"] is True and checked["state"] == "Done"
    assert checked["purl_file"] is None and checked["rows"]["ok"] > 0
    failed = by_type["batch.failed"]
    assert failed["error"]["code"] == outcome.batch.error_code
    assert failed["error"]["summary"] == outcome.batch.reason


def test_endpoints_are_https_or_loopback_and_secrets_are_standard() -> None:
    """Plain http only to the loopback address; a secret is whsec_ and base64 of 24 to
    64 bytes; the error names what is wrong and never the value."""
    def config(url: str) -> str:
        return region_toml() + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
webhooks = [{{ url = "{url}", secret = {{ env = "X" }} }}]
[clients.acme.projects.spring]
"""
    for good in ("https://hooks.acme.example/purl", "http://127.0.0.1:9000/h",
                 "http://localhost/h", "http://[::1]:80/h"):
        assert parse_config(config(good)).clients["acme"].webhooks[0].url == good
    for bad in ("http://hooks.acme.example/purl", "ftp://x/y", "https://u:p@x/y"):
        with pytest.raises(ConfigError, match="https://"):
            parse_config(config(bad))
    assert check_secret(SECRET.encode()) == SECRET
    for bad_secret, why in ((b"s3cret", "must start with whsec_"),
                            (b"whsec_not base64!", "followed by base64"),
                            (b"whsec_" + base64.b64encode(b"short"), "24 to 64 bytes")):
        with pytest.raises(ConfigError, match=why) as caught:
            check_secret(bad_secret)
        assert bad_secret.decode() not in caught.value.message


# -- a real serve, killed -------------------------------------------------------------

def serve_config(tmp_path: Path, sink: Sink, port: int) -> Path:
    text = mail_config(sink.port).replace(
        'zip_password = { env = "PG_TEST_ACME_ZIP" }',
        'zip_password = { env = "PG_TEST_ACME_ZIP" }\nwebhooks = [{ url = '
        f'"http://127.0.0.1:{port}/hook", secret = {{ env = "PG_TEST_WEBHOOK" }}, '
        'events = ["batch.done"] }]')
    cfg = tmp_path / "regions.toml"
    cfg.write_text(text)
    return cfg


def _delivered(data: Path) -> bool:
    """The webhooks' queue is empty and a delivery is recorded."""
    return not any((data / "webhooks" / "queue").glob("*.json")) and any(
        (data / "webhooks" / "sent").glob("*.json"))


@pytest.mark.asyncio
@pytest.mark.parametrize("kill", ["mid-delivery", "batch-ended"])
async def test_kill_9_still_delivers_once_more_with_the_same_id(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        kill: str) -> None:
    """`purlgate serve` killed by SIGKILL while the receiver holds the request, or
    between the batch's recorded end and its events: after a restart the event arrives
    (again, with the same webhook-id and a valid signature) and is recorded as sent."""
    monkeypatch.setenv("PG_TEST_WEBHOOK", SECRET)
    sink = await Sink().start()
    cfg, data, smtp = serve_config(tmp_path, sink, receiver.port), tmp_path / "state", free_port()
    receiver.script = [("hang", 120)] if kill == "mid-delivery" else []
    first = serve(cfg, data, smtp, crash_at=None if kill == "mid-delivery" else kill)
    try:
        await aiosmtplib.send(good_mail(), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=smtp, timeout=30)
        if kill == "mid-delivery":
            await asyncio.wait_for(receiver.arrived.wait(), 60)
            first.kill()
        assert await asyncio.to_thread(first.wait, 60) == -9
    finally:
        if first.poll() is None:
            first.kill()
        assert first.stdout is not None
        first.stdout.close()
    held = len(receiver.requests)
    assert held == (1 if kill == "mid-delivery" else 0)
    second = serve(cfg, data, smtp, crash_at=None)
    try:
        await eventually(lambda: _delivered(data), "the event delivered", timeout=60)
    finally:
        second.terminate()
        await asyncio.to_thread(second.wait, 30)
        assert second.stdout is not None
        second.stdout.close()
        await sink.stop()
    assert len(receiver.requests) == held + 1
    assert len({h["webhook-id"] for _p, h, _b in receiver.requests}) == 1
    for _path, headers, body in receiver.requests:
        assert verified(headers, body)["type"] == "batch.done"
    assert os.listdir(data / "webhooks" / "failed") == []


class OtherInstance:
    """Leases as another instance sees them: it holds every webhook lease while
    ``holding``; claims and releases are recorded."""

    instance, seconds = "here", 30.0

    def __init__(self) -> None:
        self.holding = True
        self.calls: list[tuple[str, str]] = []

    def claim(self, kind: str, key: str) -> bool:
        self.calls.append(("claim", key))
        return not self.holding

    def release(self, kind: str, key: str) -> None:
        self.calls.append(("release", key))


@pytest.mark.asyncio
async def test_with_other_instances_an_attempt_is_leased_and_read_afresh(
        rig: Rig, receiver: Receiver) -> None:
    """Sharing the folders, an entry another instance holds is left alone; one it
    deferred meanwhile (read afresh: not due) is let go again; a free one is taken and
    delivered."""
    leases = OtherInstance()
    rig.hooks.share(leases)  # type: ignore[arg-type]
    assert rig.hooks.rescan_seconds == 10.0
    rig.batch(f"comma_{T}.csv")
    listed = min(rig.hooks.entries(), key=lambda e: e.order)
    rounds = _Rounds(rig.hooks)
    assert rounds._take(listed) is None, "held by the other instance"
    leases.holding = False
    later = {**listed.data, "next_at": rig.clock.now + 60}
    listed.path.write_text(json.dumps(later))  # the other instance deferred it
    assert rounds._take(listed) is None
    assert leases.calls[-1] == ("release", listed.id)
    listed.path.write_text(json.dumps({**later, "next_at": rig.clock.now}))
    taken = rounds._take(listed)
    assert taken is not None and taken.id == listed.id
    await rig.hooks.attempt(taken)
    await rig.hooks.poster.close()
    assert verified(receiver.requests[0][1], receiver.requests[0][2])["type"] == \
        "batch.received"
