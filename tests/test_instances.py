"""Several instances of one region: two real `purlgate serve` processes on one PostgreSQL
and one shared data folder. Lose one by kill -9 and lose nothing: every accepted message
and upload is answered once, by whichever instance is left."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import asyncssh
import psycopg
import pytest

from purlgate.postgres import MIGRATIONS
from purlgate.renderers.embedded import parse_key, tokens
from purlgate.renderers.storyboard_fake import FakeBehaviour, FakeStoryboardApi
from tests.dovecot import free_port
from tests.instance_helpers import (
    INBOUND,
    SENDER,
    Instance,
    answers,
    batches,
    config,
    links_of,
    replies_by_parent,
    upload,
)
from tests.mail_helpers import (
    Sink,
    aes_zip,
    client_mail,
    good_mail,
    queues_empty,
    reply_zip,
    rows,
)
from tests.pg_helpers import PgCluster
from tests.serve_helpers import serve, setup, start
from tests.sftp_helpers import CSV, Keys
from tests.waiting import eventually

MAILS, TWICE, UPLOADS = 300, 50, 20
BIG, BIG_ROWS = "acme_spring_20261127_120000_00", 300_000


def big_mail(name: str) -> bytes:
    return client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": rows(BIG_ROWS)}),
                         "application/zip")])


def _running_on(url: str, name: str) -> str | None:
    """The instance running the batch of ``name`` now, if it is running."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT state, instance FROM batches WHERE data_name = %s",
                           (f"{name}.csv",)).fetchone()
    return str(row[1]) if row and row[0] == "In Progress" else None


def _name(n: int) -> str:
    return f"acme_spring_20261127_{101500 + n // 100:06d}_{n % 100:02d}"


async def _send(port: int, raw: bytes) -> None:
    await aiosmtplib.send(raw, sender=SENDER, recipients=[INBOUND], hostname="127.0.0.1",
                          port=port, timeout=60)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_two_instances_lose_one_and_nothing_else(tmp_path: Path, pg_url: str,
                                                       keys: Keys) -> None:
    """300 mails over both SMTP ports (50 of them delivered to both, as an MX retry
    does) and 20 SFTP uploads through both; one instance is killed mid-work and not
    restarted. The other finishes: one answer and one PURL file per message and
    upload, no name claimed twice, links served by both web ports while both live and
    every reply's by the one left, and `purlgate batches` shows them all, with who ran
    them."""
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(sink.port, keys.acme_pub))
    data = tmp_path / "shared"
    a, b = await asyncio.gather(Instance.start("box-a", cfg, data, pg_url),
                                Instance.start("box-b", cfg, data, pg_url))
    dead, alive = a, b
    try:
        distinct = MAILS - TWICE
        mails = [good_mail(_name(n)) for n in range(distinct)]
        sends = [_send((a, b)[n % 2].smtp, raw) for n, raw in enumerate(mails)]
        sends += [_send((b, a)[n % 2].smtp, raw) for n, raw in enumerate(mails[:TWICE])]
        sends += [upload((a, b)[n % 2].sftp, keys.acme, f"{_name(500 + n)}.csv", CSV)
                  for n in range(UPLOADS)]
        for start in range(0, len(sends), 16):
            await asyncio.gather(*sends[start:start + 16])
        # Both are at work; a's links answer on both ports while it lives.
        await sink.wait_to(SENDER, 20, timeout=120)
        early = links_of(sink.to(SENDER)[0])[0]
        assert {await answers(a.web, early), await answers(b.web, early)} == {200}
        # Last, a big file (to a; b may take it from the shared spool): the instance
        # running its batch dies mid-batch.
        await _send(a.smtp, big_mail(BIG))
        runner = await eventually(lambda: _running_on(pg_url, BIG),
                                  "the big batch runs", timeout=60, every=0.01)
        dead, alive = (a, b) if runner == a.name else (b, a)
        dead.kill()
        replies = await eventually(
            lambda: (found := replies_by_parent(sink)) and len(found) > distinct and found,
            "every message answered", timeout=300)
        downloads = data / "sftp" / "acme" / "spring" / "Downloads"
        await eventually(lambda: len(list(downloads.glob("PURL_*.csv"))) >= UPLOADS,
                         "every upload answered", timeout=120)
        await queues_empty(data, timeout=120)
        assert not list((data / "sftp-spool" / "incoming").iterdir())
        view = batches(cfg, data, pg_url)
        # Every reply's links, whichever instance made them, answer on the one left.
        firsts = [links_of(reply)[0] for reply in sink.to(SENDER)]
        statuses = [await answers(alive.web, link) for link in firsts]
        assert statuses == [200] * len(firsts)
    finally:
        for each in (a, b):
            if each.proc.poll() is None and each is not alive:
                each.kill()
        log = await alive.stop()
        await sink.stop()
    assert len(replies) == distinct + 1, "one reply per distinct message"
    assert all(len(ids) == 1 for ids in replies.values()), "never two different replies"
    assert len(list(downloads.glob("PURL_*.csv"))) == UPLOADS
    done = [v for v in view["batches"] if v["status"] == "Done"]
    assert len(done) == distinct + 1 + UPLOADS, "one batch per message and upload"
    assert len({v["file"] for v in done}) == len(done), "no name claimed twice"
    assert {v["instance"] for v in done} == {"box-a", "box-b"}
    big = next(v for v in done if v["file"] == f"{BIG}.csv")
    assert (big["instance"], big["rows_ok"]) == (alive.name, BIG_ROWS), "taken over"
    assert [h["status"] for h in big["history"]] == [
        "Initializing", "In Progress", "Initializing", "In Progress", "Done"]
    seen = {i["name"]: i for i in view["instances"]}
    assert set(seen) == {"box-a", "box-b"}
    assert seen[dead.name]["leases"] == [], "the dead one's leases were all taken over"
    assert seen[dead.name]["seen_seconds_ago"] > seen[alive.name]["seen_seconds_ago"]
    late = links_of(sink.to(SENDER)[-1])[-1]
    restart = await Instance.start("box-c", cfg, data, pg_url)  # any instance serves any link
    try:
        assert await answers(restart.web, late) == 200
        assert await answers(restart.web, early) == 200
    finally:
        await restart.stop()
    assert "Traceback" not in log, log
    assert f'"instance": "{alive.name}"' in log, "every log line names its instance"
    # They started together on an empty database: one made the schema, both served.
    assert sum(i.log.read_text().count("database schema migrated") for i in (a, b)) == \
        len(MIGRATIONS), "each migration once"


@pytest.mark.asyncio
async def test_a_paid_batch_moves_to_the_other_instance_without_paying_twice(
        tmp_path: Path, pg_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40-row batch renders through the (fake) render API; the instance running it is
    killed mid-batch and never comes back. The other takes the batch over once the lease
    runs out, reads what was asked from the shared render ledger, and asks only for the
    rest: every row rendered (paid) exactly once, one reply with all 40 rows. A row is
    asked a second time only if its request was on the wire when the first instance
    died (at most the API's concurrency, 4), under the same Idempotency-Key."""
    monkeypatch.setenv("PG_TEST_RENDER_PASSWORD", "secret")
    api = await FakeStoryboardApi(FakeBehaviour(delay_seconds=0.05)).start()
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(sink.port, keys.acme_pub, render_api=api.base_url))
    data = tmp_path / "shared"
    a, b = await asyncio.gather(Instance.start("box-a", cfg, data, pg_url),
                                Instance.start("box-b", cfg, data, pg_url))
    dead, alive = a, b
    name = f"{_name(0)}.csv"
    try:
        mail = client_mail([(f"{_name(0)}.zip", aes_zip({name: rows(40)}), "application/zip")])
        await _send(a.smtp, mail)
        await eventually(lambda: len(api.renders) >= 8, "some rows rendered", every=0.01)
        runner = await asyncio.to_thread(_running_on, pg_url, _name(0))
        dead, alive = (a, b) if runner == a.name else (b, a)
        dead.kill()
        paid_before = len(api.renders)
        replies = await sink.wait_to(SENDER, timeout=120)
        await queues_empty(data)
    finally:
        for each in (a, b):
            if each.proc.poll() is None and each is not alive:
                each.kill()
        await alive.stop()
        await sink.stop()
        await api.stop()
    assert 8 <= paid_before < 40, "killed mid-batch"
    assert len(replies) == 1
    assert len(api.renders) == 40 and set(api.renders.values()) == {1}, api.renders
    again = [key for key, n in api.requests.items() if n > 1]
    assert len(again) <= 4 and max(api.requests.values()) <= 2, api.requests
    purl = reply_zip(replies[0])[f"PURL_{name}"].decode()
    assert [r["first_name"] for r in csv.DictReader(io.StringIO(purl))] == [
        f"Zoë{i}" for i in range(40)]


@pytest.mark.asyncio
async def test_one_name_uploaded_to_both_at_the_same_moment(tmp_path: Path, pg_url: str,
                                                             keys: Keys) -> None:
    """Two sessions, one on each instance, open the same name at the same moment: one
    may write it, the other is refused at once (status and a note in Downloads), and
    one batch comes of it. Sent again later to the other instance, the name is refused
    with the time it was first received."""
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(sink.port, keys.acme_pub))
    data = tmp_path / "shared"
    a, b = await asyncio.gather(Instance.start("box-a", cfg, data, pg_url),
                                Instance.start("box-b", cfg, data, pg_url))
    name = f"{_name(7)}.csv"
    downloads = data / "sftp" / "acme" / "spring" / "Downloads"
    try:
        async with _sftp(a.sftp, keys) as one, _sftp(b.sftp, keys) as two:
            opened = await asyncio.gather(
                *(s.open(f"/spring/Uploads/{name}", "wb") for s in (one, two)),
                return_exceptions=True)
            won = [f for f in opened if not isinstance(f, BaseException)]
            lost = [e for e in opened if isinstance(e, BaseException)]
            assert len(won) == 1 and len(lost) == 1, opened
            assert isinstance(lost[0], asyncssh.SFTPError)
            assert lost[0].reason == (f"a file named {name} is being received already; "
                                      "upload it under a new name")
            await won[0].write(CSV)
            await won[0].close()
        await eventually((downloads / f"PURL_{name}").exists, "the PURL file")
        note = downloads / f"{name}_refused.txt"
        assert "is being received already" in note.read_text()
        loser = b if isinstance(opened[1], BaseException) else a
        with pytest.raises(asyncssh.SFTPError, match=rf"a file named {name} was received at "
                                                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"):
            await upload(loser.sftp, keys.acme, name, CSV)
        view = batches(cfg, data, pg_url)
    finally:
        await asyncio.gather(a.stop(), b.stop())
        await sink.stop()
    assert [v["status"] for v in view["batches"] if v["file"] == name] == ["Done"]


def _sftp(port: int, keys: Keys) -> Any:
    return _SftpClient(port, keys.acme)


class _SftpClient:
    def __init__(self, port: int, key: Path) -> None:
        self.port, self.key = port, key

    async def __aenter__(self) -> asyncssh.SFTPClient:
        self.conn = await asyncssh.connect("127.0.0.1", self.port, username="acme",
                                           known_hosts=None, client_keys=[str(self.key)],
                                           agent_path=None)
        self.sftp = await self.conn.start_sftp_client()
        return self.sftp

    async def __aexit__(self, *exc: object) -> None:
        self.sftp.exit()
        self.conn.close()
        await self.conn.wait_closed()


@pytest.mark.asyncio
async def test_the_database_away_intake_waits_and_resumes(
        tmp_path: Path, pg_cluster: PgCluster, keys: Keys) -> None:
    """The database goes away under a running instance: /readyz answers 503 naming it,
    SMTP answers 451 (the sending server keeps the mail and tries again), an SFTP
    upload fails with a sentence saying so, a link it cannot check answers 503 (not
    404), and nothing is stored. Once the database is
    back, the same process takes mail again and answers it, without a restart."""
    url = pg_cluster.url(pg_cluster.new_database())
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(sink.port, keys.acme_pub))
    data = tmp_path / "shared"
    one = await Instance.start("box-a", cfg, data, url)
    try:
        pg_cluster.stop()
        try:
            ready = await eventually(lambda: _ready(one.web, want=503), "readiness 503")
            assert ready["checks"]["database"]["ok"] is False
            assert "database" in ready["checks"]["database"]["detail"]
            assert "purlgate_database_up 0.0" in await _get(one.web, "/metrics")
            # A link of a batch this instance has not seen (another's, say): it cannot
            # be checked now, and says so rather than "not found".
            key = parse_key((data / "token.key").read_bytes())
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{one.web}/p/{tokens(key, 4242, 0, 1)[0]}") as page:
                assert (page.status, page.headers["Retry-After"]) == (503, "5")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await _send(one.smtp, good_mail(_name(1)))
            assert refused.value.code == 451
            assert "database unreachable" in refused.value.message
            with pytest.raises(asyncssh.SFTPError, match="its database is unreachable"):
                await upload(one.sftp, keys.acme, f"{_name(2)}.csv", CSV)
            assert not list((data / "spool" / "incoming").iterdir())
            assert not list((data / "sftp-spool" / "incoming").iterdir())
        finally:
            pg_cluster.start()
        await eventually(lambda: _ready(one.web, want=200), "ready again", timeout=30)
        await _send(one.smtp, good_mail(_name(1)))
        await sink.wait_to(SENDER, timeout=60)
        metrics = await _get(one.web, "/metrics")
        assert "purlgate_database_up 1.0" in metrics
        assert 'purlgate_instance_seen_seconds{instance="box-a"}' in metrics
        assert 'purlgate_instance_leases{instance="box-a"}' in metrics
        view = json.loads(await _get(one.web, "/ops/api/batches"))
        assert [b["instance"] for b in view["batches"]] == ["box-a"]
        assert [i["name"] for i in view["instances"]] == ["box-a"]
        page = await _get(one.web, "/ops/batches")
        assert '<td>box-a</td>\n<td class="audit">' in page  # the batch's, then its trail
        assert "<h2>Instances</h2>" in page
    finally:
        log = await one.stop()
        await sink.stop()
    assert "the database is reachable again: intake resumes" in log


async def _get(web_port: int, path: str) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{web_port}{path}") as response:
        assert response.status == 200, path
        return await response.text()


async def _ready(web_port: int, want: int) -> dict[str, Any] | None:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{web_port}/readyz") as response:
        body: dict[str, Any] = await response.json()
        return body if response.status == want else None


def test_check_config_names_what_is_wrong_with_the_database(tmp_path: Path,
                                                            pg_cluster: PgCluster,
                                                            keys: Keys) -> None:
    """`purlgate check-config` connects to the region's database and says in one line
    what is wrong: the password refused, nobody listening, a schema newer than this
    release; an empty database (before the first start) is fine."""
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(9, keys.acme_pub))
    url = pg_cluster.url(pg_cluster.new_database())

    def check(database_url: str) -> subprocess.CompletedProcess[str]:
        exe = str(Path(sys.executable).with_name("purlgate"))
        return subprocess.run(
            [exe, "check-config", "--config", str(cfg)], capture_output=True, text=True,
            timeout=60, check=False, env={**os.environ, "PG_TEST_ACME_ZIP": "x",
                                          "PURLGATE_DATABASE_URL": database_url})

    fine = check(url)
    assert (fine.returncode, fine.stdout.splitlines()[-1]) == (0, "configuration OK")
    wrong = check(url.replace("pg-test-secret", "nope"))
    assert wrong.returncode == 2
    assert ("region usa: field database.url: database refused: password authentication "
            "failed") in wrong.stderr
    gone = check(f"postgresql://purlgate:x@127.0.0.1:{free_port()}/nowhere")
    assert gone.returncode == 2
    assert "region usa: field database.url: database unreachable" in gone.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE purlgate_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO purlgate_schema VALUES (99)")
    newer = check(url)
    assert newer.returncode == 2
    assert "the database is of schema 99, newer than this release" in newer.stderr
    assert "pg-test-secret" not in wrong.stderr + gone.stderr + newer.stderr, "no password"


@pytest.mark.asyncio
async def test_a_second_instance_on_the_embedded_backend_is_refused(tmp_path: Path) -> None:
    """Without a database a region is one instance: a second `purlgate serve` on the
    same data_dir stops at start with one line saying why and what to do, and the
    first goes on serving; once the first has stopped, a new one starts."""
    sink = await Sink().start()
    cfg, data, smtp = setup(tmp_path, sink)
    first = serve(cfg, data, smtp, crash_at=None)
    try:
        second = start(cfg, data, free_port(), logs=True)
        _, err = await asyncio.to_thread(second.communicate, None, 60)
        assert second.returncode == 2
        assert (f"purlgate: configuration error: another `purlgate serve` of region usa "
                f"uses {data}; a region runs several instances only on a shared database "
                "([regions.usa.database], README: Running several instances)") in err
        await _send(smtp, good_mail(_name(3)))
        await sink.wait_to(SENDER, timeout=60)
    finally:
        first.kill()  # however it ends, its lock goes with it
        await asyncio.to_thread(first.wait, 30)
        assert first.stdout is not None
        first.stdout.close()
    third = serve(cfg, data, smtp, crash_at=None)
    third.terminate()
    await asyncio.to_thread(third.wait, 30)
    assert third.stdout is not None
    third.stdout.close()
    await sink.stop()
