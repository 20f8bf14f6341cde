"""The storyboard-api renderer against the shipped fake of the platform's render API."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio

from purlgate.app import build_gateway
from purlgate.config import parse_config
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import BatchOutcome, Submission
from purlgate.region import build_region
from purlgate.renderers.storyboard_fake import FakeBehaviour, FakeStoryboardApi
from tests.config_builder import Raw, region_toml
from tests.dovecot import free_port
from tests.mail_helpers import (
    INBOUND,
    PASSWORD,
    SENDER,
    Sink,
    aes_zip,
    client_mail,
    queues_empty,
    reply_zip,
)

NAME = "acme_spring_20261127_101500_00.csv"

CONFIG = region_toml(
    data_dir="{data}", smtp={"port": Raw("{smtp}")},
    relay={"port": Raw("{relay}"), "operator": "ops@idomoo.example",
           "retry_first_seconds": 0.2},
    storyboard={"base_url": "{api}", "username": "purlgate",
                "password": Raw('{{ env = "PG_TEST_RENDER_PASSWORD" }}'), "concurrency": 4,
                "requests_per_second": Raw("{rps}"), "timeout_seconds": 5,
                "max_attempts": Raw("{attempts}"), "backoff_first_seconds": 0.01,
                "backoff_max_seconds": 0.05, "poll_seconds": 0.01}) + """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data-team@acme.example"]
zip_password = {{ env = "PG_TEST_ACME_ZIP" }}

[clients.acme.projects.spring]
render.backend = "storyboard-api"
render.storyboard_id = "8801"
render.fields = {{ first_name = "FirstName", email = "Email" }}
"""


def data(n: int, *, bad: set[int] | None = None) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["first_name", "email", "city"])
    for i in range(n):
        w.writerow([f"Zoë{i}", "bad@acme.example" if i in (bad or set()) else
                    f"u{i}@acme.example", "Paris"])
    return out.getvalue().encode()


def config_text(tmp: Path, api: str, *, smtp: int = 0, relay: int = 9,
                attempts: int = 5, rps: int = 500) -> str:
    return CONFIG.format(data=tmp / "usa", api=api, smtp=smtp, relay=relay, attempts=attempts,
                         rps=rps)


@pytest_asyncio.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeStoryboardApi]:
    monkeypatch.setenv("PG_TEST_RENDER_PASSWORD", "secret")
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    fake = await FakeStoryboardApi().start()
    yield fake
    await fake.stop()


async def process(tmp: Path, fake: FakeStoryboardApi, body: bytes, *,
                  attempts: int = 5, rps: int = 500) -> BatchOutcome:
    config = config_text(tmp, fake.base_url, attempts=attempts, rps=rps)
    region = build_region(parse_config(config), "usa")
    source = tmp / NAME
    source.write_bytes(body)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    try:
        return await asyncio.to_thread(
            region.processor.process,
            Submission(path=source, received_name=NAME, channel="test", client_id="acme"), out)
    finally:
        region.close()


def purl(outcome: BatchOutcome) -> list[dict[str, str]]:
    assert outcome.purl is not None
    with outcome.purl.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.asyncio
async def test_links_come_from_the_api_one_render_per_row(tmp_path: Path,
                                                          api: FakeStoryboardApi) -> None:
    """Each row is rendered once with its mapped data; the PURL file carries the API's
    thumbnail and landing-page links; no row data of ours is needed (no row store)."""
    outcome = await process(tmp_path, api, data(20))
    assert outcome.state is BatchState.DONE
    rows = purl(outcome)
    assert len(rows) == 20
    assert all(r["thumbnail_1"].startswith("https://cdn.fake-render.example/t/") for r in rows)
    assert all(r["landingPage"].startswith("https://cdn.fake-render.example/lp/") for r in rows)
    assert len({r["landingPage"] for r in rows}) == 20
    assert len(api.renders) == 20 and set(api.renders.values()) == {1}
    assert set(api.requests.values()) == {1}
    sent = api.rows["purlgate-usa-1-3"]
    assert sent == {"FirstName": "Zoë3", "Email": "u3@acme.example"}, "mapped, city not sent"
    assert not list((tmp_path / "usa" / "rows").iterdir()), "no row store"


@pytest.mark.asyncio
async def test_a_row_that_fails_is_a_row_error(tmp_path: Path, api: FakeStoryboardApi) -> None:
    """The API fails one row's render: that row is in the error file with a reason, the
    rest are delivered, the batch is Done with Errors, and nothing is asked twice."""
    api.behaviour = FakeBehaviour(fail_values=frozenset({"bad@acme.example"}),
                                  polls_until_ready=2)
    outcome = await process(tmp_path, api, data(10, bad={4}))
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    assert [r["first_name"] for r in purl(outcome)] == [f"Zoë{i}" for i in range(10) if i != 4]
    assert outcome.errors is not None
    assert outcome.errors.read_text().splitlines()[1:] == [
        "6,,the video could not be rendered for this row"]
    assert set(api.renders.values()) == {1} and len(api.renders) == 10


@pytest.mark.asyncio
async def test_throttling_and_server_errors_are_retried(tmp_path: Path,
                                                        api: FakeStoryboardApi) -> None:
    """429 (with Retry-After) and 500 answers are retried with backoff; every row ends
    rendered, once."""
    api.behaviour = FakeBehaviour(throttle_first=6, retry_after="0", error_first=4,
                                  polls_until_ready=3)
    outcome = await process(tmp_path, api, data(8))
    assert outcome.state is BatchState.DONE
    assert len(api.renders) == 8 and set(api.renders.values()) == {1}
    assert api.status_calls >= 8 * 3


@pytest.mark.asyncio
async def test_an_api_that_never_recovers_fails_rows_not_forever(
        tmp_path: Path, api: FakeStoryboardApi) -> None:
    """A 500 on every request: after max_attempts each row is an error; with no row
    left the batch fails with the error list's words."""
    api.behaviour = FakeBehaviour(error_first=10_000)
    outcome = await process(tmp_path, api, data(3), attempts=3)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == ("no row could be used: every data row has an error "
                                    "(see the error list)")
    assert outcome.errors is not None
    assert outcome.errors.read_text().count("did not answer after 3 attempts") == 3
    assert api.renders == {}


@pytest.mark.asyncio
async def test_refused_credentials_fail_the_batch_and_alert_the_operator(
        tmp_path: Path, api: FakeStoryboardApi) -> None:
    """401 from the API: the batch fails with a message the client can read (our side,
    operators alerted), and an alert for the operator is really queued, naming region,
    client and batch, with no row data."""
    api.behaviour = FakeBehaviour(refuse_auth=True)
    gateway = build_gateway(parse_config(config_text(tmp_path, api.base_url)), "usa")
    source = tmp_path / NAME
    source.write_bytes(data(3))
    out = tmp_path / "out"
    out.mkdir()
    try:
        outcome = await asyncio.to_thread(
            gateway.region.processor.process,
            Submission(path=source, received_name=NAME, channel="test", client_id="acme"),
            out)
    finally:
        gateway.region.close()
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "render-auth"
    assert outcome.batch.reason == (
        "our video rendering service refused our credentials, so no video was made; this "
        "is on our side and our operators have been alerted")
    queued = sorted((tmp_path / "usa" / "outbox" / "queue").glob("alert-*.msg"))
    assert [p.name for p in queued] == ["alert-usa-1.msg"]
    alert = queued[0].read_text()
    assert "To: ops@idomoo.example" in alert
    assert "Region: usa" in alert and "Client: acme" in alert and "Batch: 1" in alert
    assert "Zoë" not in alert and "u0@acme.example" not in alert


@pytest.mark.asyncio
async def test_encoding_is_settled_before_the_first_paid_render(
        tmp_path: Path, api: FakeStoryboardApi) -> None:
    """A Windows-1252 file whose first 256 KiB are plain ASCII (so its head looks like
    UTF-8) is read once, as Windows-1252: every row is rendered exactly once, and the
    late accented name arrives right."""
    head = "".join(f"Zoe{i},u{i}@acme.example,{'Paris ' * 10}\n" for i in range(4000))
    body = ("first_name,email,city\n" + head).encode("ascii")
    assert len(body) > 256 * 1024
    late = "Zoë-late,late@acme.example,Chêne\n".encode("cp1252")
    outcome = await process(tmp_path, api, body + late, attempts=3, rps=5000)
    assert outcome.state is BatchState.DONE
    assert sum(api.renders.values()) == 4001 == len(api.renders)
    assert max(api.requests.values()) == 1
    assert api.rows["purlgate-usa-1-0"]["FirstName"] == "Zoe0"
    assert api.rows["purlgate-usa-1-4000"]["FirstName"] == "Zoë-late"


@pytest.mark.asyncio
async def test_kill_mid_batch_resumes_without_paying_twice(tmp_path: Path,
                                                           api: FakeStoryboardApi) -> None:
    """kill -9 of a real `purlgate serve` while the API renders a 40-row email batch:
    after restart the batch resumes with the rows still missing, every row was paid for
    exactly once, and exactly one reply with all 40 rows reaches the client."""
    api.behaviour = FakeBehaviour(delay_seconds=0.05)
    sink = await Sink().start()
    smtp = free_port()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config_text(tmp_path, api.base_url, smtp=smtp, relay=sink.port))
    exe = str(Path(sys.executable).with_name("purlgate"))
    env = {**os.environ}

    async def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=tmp_path, env=env)
        assert proc.stdout is not None
        banner = await asyncio.to_thread(proc.stdout.readline)
        assert "accepting mail" in banner, banner
        return proc

    first = await start()
    try:
        mail = client_mail([(f"{NAME[:-4]}.zip", aes_zip({NAME: data(40)}), "application/zip")])
        await aiosmtplib.send(mail, sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=smtp)
        for _ in range(600):  # until the API has started some renders, not all
            if len(api.renders) >= 8:
                break
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait)
    finally:
        if first.poll() is None:
            first.kill()
        assert first.stdout is not None
        first.stdout.close()
    paid_before = len(api.renders)
    assert 8 <= paid_before < 40, "killed mid-batch"
    second = await start()
    try:
        replies = await sink.wait_to(SENDER, timeout=60)
        assert len(replies) == 1
        await queues_empty(tmp_path / "usa")
    finally:
        second.terminate()
        await asyncio.to_thread(second.wait, 30)
        assert second.stdout is not None
        second.stdout.close()
        await sink.stop()
    assert len(sink.to(SENDER)) == 1
    assert len(api.renders) == 40 and set(api.renders.values()) == {1}, api.renders
    files = reply_zip(sink.to(SENDER)[0])
    rows = list(csv.DictReader(io.StringIO(files[f"PURL_{NAME}"].decode("utf-8"))))
    assert [r["first_name"] for r in rows] == [f"Zoë{i}" for i in range(40)]
    assert all(r["landingPage"].startswith("https://cdn.fake-render.example/lp/")
               for r in rows)
