"""Operations over HTTP: health, readiness, metrics and the batch view, on a real server."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from purlgate.passwords import hash_password
from purlgate.web.ops import LOGIN_WINDOW, MAX_FAILED_LOGINS, LoginLimiter
from tests.mail_helpers import Sink
from tests.web_helpers import data_file, running

NAME = "acme_spring_20261127_101500_00.csv"


@pytest.mark.asyncio
async def test_health_and_readiness_say_what_is_wrong(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/healthz is up as long as the process is; /readyz checks listeners, disk and the
    relay and says what it found. A relay that does not answer keeps the instance in
    the load balancer (200: replies wait durably in the outbox) but is reported, in
    /readyz, in purlgate_relay_up and in one ERROR log line."""
    sink = await Sink().start()
    try:
        async with running(tmp_path, relay=9) as run:
            async with run.http.get(run.base + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
            for _ in range(2):
                async with run.http.get(run.base + "/readyz") as resp:
                    body = await resp.json()
                    assert resp.status == 200
                    assert body["ready"] is True
                    assert body["checks"]["listeners"] == {"ok": True, "detail": "all bound"}
                    assert body["checks"]["disk"]["ok"] is True
                    assert body["checks"]["relay"]["ok"] is False
                    assert body["checks"]["relay"]["detail"].startswith("127.0.0.1:9:")
            down = [r for r in caplog.records if r.getMessage().startswith(
                "the relay does not answer (127.0.0.1:9:")]
            assert len(down) == 1 and down[0].levelname == "ERROR", "logged once"
            async with run.http.get(run.base + "/metrics") as resp:
                assert "purlgate_relay_up 0.0" in (await resp.text()).splitlines()
        async with running(tmp_path / "b", relay=sink.port) as run, \
                run.http.get(run.base + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["checks"]["relay"] == {"ok": True,
                                               "detail": f"127.0.0.1:{sink.port} answers"}
    finally:
        await sink.stop()


@pytest.mark.asyncio
async def test_metrics_count_batches_rows_and_queues(tmp_path: Path) -> None:
    """/metrics speaks Prometheus: batches by channel and status, rows, durations, SMTP
    outcomes, outbox, spool and render queue gauges."""
    async with running(tmp_path) as run:
        await run.process(NAME, data_file(5))
        await run.process("acme_spring_20261127_111500_00.csv", b"first_name,email\r\n")
        async with run.http.get(run.base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = await resp.text()
    lines = set(text.splitlines())
    assert 'purlgate_batches_total{channel="test",status="Done"} 1.0' in lines
    assert 'purlgate_batches_total{channel="test",status="Failed"} 1.0' in lines
    assert 'purlgate_rows_total{outcome="ok"} 5.0' in lines
    assert 'purlgate_rows_total{outcome="error"} 0.0' in lines
    assert "purlgate_batch_duration_seconds_count 2.0" in lines
    for gauge in ("purlgate_outbox_depth", "purlgate_outbox_failed", "purlgate_spool_depth",
                  "purlgate_render_queue_depth", "purlgate_outbox_oldest_age_seconds",
                  "purlgate_webhooks_depth", "purlgate_webhooks_failed",
                  "purlgate_webhooks_oldest_age_seconds"):
        assert any(line.startswith(gauge + " ") for line in lines), gauge
    assert "José" not in text


@pytest.mark.asyncio
async def test_batch_view_lists_and_filters_without_row_data(tmp_path: Path) -> None:
    """The batch view (HTML and JSON) lists batches with status, counts and file names,
    filters by client and status, and shows no row value."""
    async with running(tmp_path) as run:
        await run.process(NAME, data_file(4))
        await run.process("acme_spring_20261127_111500_00.csv", b"first_name,email\r\n")
        async with run.http.get(run.base + "/ops/api/batches") as resp:
            body = await resp.json()
        assert [b["status"] for b in body["batches"]] == ["Failed", "Done"]
        done = body["batches"][1]
        assert (done["client"], done["project"], done["channel"], done["file"]) == (
            "acme", "spring", "test", NAME)
        assert (done["rows"], done["rows_ok"], done["rows_error"]) == (4, 4, 0)
        assert done["outputs"] == [f"PURL_{NAME}", f"PURL_{NAME}.flg"]
        async with run.http.get(run.base + "/ops/api/batches?status=Failed") as resp:
            failed = (await resp.json())["batches"]
        assert [b["file"] for b in failed] == ["acme_spring_20261127_111500_00.csv"]
        assert failed[0]["reason"].startswith("the file has a header but no data rows")
        async with run.http.get(run.base + "/ops/api/batches?client=globex") as resp:
            assert (await resp.json())["batches"] == []
        async with run.http.get(run.base + "/ops/batches?status=Done") as resp:
            html = await resp.text()
            assert resp.status == 200
        assert NAME in html and "Failed" not in html.split("<tbody>")[1]
        assert "José" not in html and "user0@acme.example" not in html


@pytest.mark.asyncio
async def test_ops_routes_need_the_network_or_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside ops_networks, readiness, metrics and the batch view need Basic auth with
    the ops password (401 and a challenge otherwise); /healthz stays open."""
    monkeypatch.setenv("PG_TEST_OPS_PASSWORD", "s3cret")
    extra = 'ops_networks = []\nops_password = { env = "PG_TEST_OPS_PASSWORD" }'
    async with running(tmp_path, web_extra=extra) as run:
        for path in ("/readyz", "/metrics", "/ops/batches", "/ops/api/batches"):
            async with run.http.get(run.base + path) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"] == 'Basic realm="purlgate usa"'
        wrong = "Basic " + base64.b64encode(b"ops:nope").decode()
        async with run.http.get(run.base + "/metrics",
                                headers={"Authorization": wrong}) as resp:
            assert resp.status == 401
        right = "Basic " + base64.b64encode(b"ops:s3cret").decode()
        async with run.http.get(run.base + "/metrics",
                                headers={"Authorization": right}) as resp:
            assert resp.status == 200
        async with run.http.get(run.base + "/healthz") as resp:
            assert resp.status == 200


@pytest.mark.asyncio
async def test_batch_view_links_an_sftp_batch_error_file(tmp_path: Path) -> None:
    """An SFTP batch's error file, still in the client's Downloads, is linked from the
    batch view and served to the operator as CSV; a batch without one has no link."""
    tail = ('\n[regions.usa.sftp]\nport = 0\n[clients.acme.sftp]\nusername = "acme"\n'
            f'password_hash = "{hash_password("pw")}"\n')
    async with running(tmp_path, tail=tail) as run:
        service = run.gateway.sftp_service
        assert service is not None
        downloads = service.downloads("acme", "spring")
        ragged = b"first_name,email\r\na,b\r\nc,d,e\r\nf,g\r\n"
        await run.process(NAME, ragged, channel="sftp", out=downloads)
        await run.process("acme_spring_20261127_111500_00.csv", data_file(2))
        async with run.http.get(run.base + "/ops/api/batches") as resp:
            batches = {b["id"]: b for b in (await resp.json())["batches"]}
        assert batches[2]["error_file_url"] is None
        url = batches[1]["error_file_url"]
        assert url == "/ops/batches/1/errors"
        async with run.http.get(run.base + url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert (await resp.text()).splitlines() == [
                "row,column,reason", '3,,"has 3 fields, the header has 2"']
        async with run.http.get(run.base + "/ops/batches/2/errors") as resp:
            assert resp.status == 404


@pytest.mark.asyncio
async def test_ops_password_guesses_are_rate_limited_per_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Ten wrong ops passwords from one address: the tenth and what follows get 429 with
    Retry-After, even with the right password, which is not even checked then;
    the refusal is logged once; the window passing lets it in again."""
    monkeypatch.setenv("PG_TEST_OPS_PASSWORD", "s3cret")
    extra = 'ops_networks = []\nops_password = { env = "PG_TEST_OPS_PASSWORD" }'
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ops:guess").decode()}
    right = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    async with running(tmp_path, web_extra=extra) as run:
        assert run.gateway.ops is not None
        now = [1000.0]
        run.gateway.ops.logins = LoginLimiter(lambda: now[0])
        statuses = []
        for _ in range(MAX_FAILED_LOGINS):
            async with run.http.get(run.base + "/metrics", headers=wrong) as resp:
                statuses.append(resp.status)
        assert statuses == [401] * (MAX_FAILED_LOGINS - 1) + [429]
        async with run.http.get(run.base + "/metrics", headers=right) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == str(int(LOGIN_WINDOW) + 1)
            assert await resp.text() == "Too many failed logins; try again later\n"
        now[0] += LOGIN_WINDOW + 1
        async with run.http.get(run.base + "/metrics", headers=right) as resp:
            assert resp.status == 200
    refusals = [r for r in caplog.records if "ops logins from 127.0.0.1 refused" in r.getMessage()]
    assert len(refusals) == 1 and "s3cret" not in caplog.text and "guess" not in caplog.text
