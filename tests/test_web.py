"""The links in a PURL file answer: landing page, thumbnail and video, from a real server."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import ssl
import statistics
import time
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiosmtplib import SMTP
from PIL import Image

from purlgate.config import WebConfig, parse_config
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import Submission
from purlgate.errors import ConfigError, RenderTimeoutError
from purlgate.region import build_region
from purlgate.renderers.columns import default_template_dir
from purlgate.renderers.embedded import decode, tokens
from purlgate.web.media import MAX_DRAWN_CHARS, Canvas, Text, _fit, _font, render_thumbnail
from purlgate.web.render_pool import RenderPool
from purlgate.web.tls import tls_context
from tests.slow_draw import draw_forever
from tests.waiting import eventually
from tests.web_helpers import NAMES, Running, data_file, make_config, purl_rows, running

NAME = "acme_spring_20261127_101500_00.csv"
SAME_404 = ("Not found\n", "no-store")


async def get(run: Running, link: str, **kw: object) -> aiohttp.ClientResponse:
    async with run.http.get(run.url(link), **kw) as resp:  # type: ignore[arg-type]
        await resp.read()
        return resp


@pytest.mark.asyncio
async def test_landing_page_shows_the_row_escaped_with_security_headers(tmp_path: Path) -> None:
    """Each row's landingPage link serves that row's page: its name shown (HTML-escaped,
    so a value cannot become script), the video with the thumbnail as poster, and the
    headers that keep it private (CSP, no referrer, no indexing)."""
    async with running(tmp_path) as run:
        outcome = await run.process(NAME, data_file(6))
        assert outcome.state is BatchState.DONE
        rows = purl_rows(outcome.purl)  # type: ignore[arg-type]
        for row in rows:
            async with run.http.get(run.url(row["landingPage"])) as resp:
                html = await resp.text()
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
                assert resp.headers["Referrer-Policy"] == "no-referrer"
                assert "noindex" in resp.headers["X-Robots-Tag"]
                assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            token = row["landingPage"].rsplit("/", 1)[1]
            assert f'poster="/purl/t/{token}.jpg"' in html
            assert f'src="/purl/v/{token}.mp4"' in html
            if row["first_name"].startswith("<script>"):
                assert "<script>" not in html
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
            else:
                assert f"Hi {row['first_name']}!" in html
        css = html.split('href="', 1)[1].split('"', 1)[0]
        async with run.http.get(run.base + css) as resp:
            assert resp.status == 200
            assert "text/css" in resp.headers["Content-Type"]


@pytest.mark.asyncio
async def test_thumbnail_and_video_are_real_media_rendered_once(tmp_path: Path) -> None:
    """thumbnail_1 is a 640x360 JPEG, the video an H.264 yuv420p 1280x720 MP4 of 4 s;
    a second view comes from the cache (same bytes, no new render), HEAD works, and
    caching headers say the render is immutable."""
    async with running(tmp_path) as run:
        outcome = await run.process(NAME, data_file(2))
        row = purl_rows(outcome.purl)[0]  # type: ignore[arg-type]
        async with run.http.get(run.url(row["thumbnail_1"])) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert "immutable" in resp.headers["Cache-Control"]
            jpeg = await resp.read()
        image = Image.open(io.BytesIO(jpeg))
        assert (image.format, image.size) == ("JPEG", (640, 360))
        video_link = row["landingPage"].replace("/p/", "/v/") + ".mp4"
        async with run.http.get(run.url(video_link)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "video/mp4"
            mp4 = await resp.read()
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert (stream.width, stream.height) == (1280, 720)
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert container.duration is not None
            assert abs(container.duration / 1e6 - 4.0) < 0.1
            frames = sum(1 for _ in container.decode(video=0))
            assert frames == 100
        assert mp4[4:8] == b"ftyp" and mp4.index(b"moov") < mp4.index(b"mdat"), "faststart"
        cached = sorted((tmp_path / "usa" / "renders").rglob("*.*"))
        stamps = [p.stat().st_mtime_ns for p in cached]
        async with run.http.get(run.url(row["thumbnail_1"])) as resp:
            assert await resp.read() == jpeg
        async with run.http.head(run.url(row["thumbnail_1"])) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(jpeg)
        assert [p.stat().st_mtime_ns for p in cached] == stamps, "a cache hit renders nothing"
        assert len(cached) == 2


@pytest.mark.asyncio
async def test_range_requests_return_the_right_bytes(tmp_path: Path) -> None:
    """Browsers seek with Range: 206 with exactly the asked bytes, a suffix range, and 416
    past the end."""
    async with running(tmp_path) as run:
        outcome = await run.process(NAME, data_file(1))
        row = purl_rows(outcome.purl)[0]  # type: ignore[arg-type]
        video = run.url(row["landingPage"].replace("/p/", "/v/") + ".mp4")
        async with run.http.get(video) as resp:
            whole = await resp.read()
        async with run.http.get(video, headers={"Range": "bytes=100-199"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
            assert await resp.read() == whole[100:200]
        async with run.http.get(video, headers={"Range": "bytes=-50"}) as resp:
            assert resp.status == 206
            assert await resp.read() == whole[-50:]
        async with run.http.get(video, headers={"Range": f"bytes={len(whole) + 10}-"}) as resp:
            assert resp.status == 416


@pytest.mark.asyncio
async def test_unknown_malformed_forged_and_expired_tokens_get_the_same_404(
        tmp_path: Path) -> None:
    """Whatever is wrong with a token, the answer is the same 404 (body, headers), in
    the same time, for pages, thumbnails and videos; an expired batch's links are dead."""
    async with running(tmp_path) as run:
        good = purl_rows((await run.process(NAME, data_file(3))).purl)[0]  # type: ignore[arg-type]
        short = purl_rows((await run.process(  # type: ignore[arg-type]
            "acme_short_20261127_101500_00.csv", data_file(1), project="short")).purl)[0]
        token = good["landingPage"].rsplit("/", 1)[1]
        forged = token[:-1] + ("0" if token[-1] != "0" else "1")
        key = run.gateway.region.token_key
        batch_id = decode(key, token)[0]  # type: ignore[index]
        beyond = tokens(key, batch_id, 99, 1)[0].as_py()  # a real token, no such row
        unknown_batch = tokens(key, 777, 0, 1)[0].as_py()  # a real token, no such batch
        # The short project keeps links 1 day: move the web side's clock 2 days on.
        links = run.gateway.links
        assert links is not None
        real_clock = links.clock
        expired = short["landingPage"].rsplit("/", 1)[1]
        bad = {"malformed": "not-a-token", "short": "abc", "upper": token.upper(),
               "forged": forged, "beyond": beyond, "unknown-batch": unknown_batch}
        for kind in ("p", "t", "v"):
            suffix = {"p": "", "t": ".jpg", "v": ".mp4"}[kind]
            for label, t in bad.items():
                async with run.http.get(f"{run.base}/purl/{kind}/{t}{suffix}") as resp:
                    body = await resp.text()
                    assert (resp.status, body, resp.headers["Cache-Control"]) == \
                        (404, *SAME_404), (kind, label)
        async with run.http.get(run.url(short["landingPage"])) as resp:
            assert resp.status == 200
        skew = timedelta(days=2)
        links.clock = lambda: real_clock() + skew
        links.index._clock = links.clock
        async with run.http.get(f"{run.base}/purl/p/{expired}") as resp:
            assert (resp.status, await resp.text()) == (404, SAME_404[0])
        async with run.http.get(run.url(good["landingPage"])) as resp:
            assert resp.status == 200, "30-day retention: still alive"
        # Timing: the median answer of each kind of bad token is the same within noise.
        medians = {}
        for label, t in {**bad, "expired": expired}.items():
            samples = []
            for _ in range(60):
                start = time.perf_counter()
                async with run.http.get(f"{run.base}/purl/p/{t}") as resp:
                    await resp.read()
                samples.append(time.perf_counter() - start)
            medians[label] = statistics.median(samples)
        spread = max(medians.values()) - min(medians.values())
        assert spread < 0.5e-3, medians


@pytest.mark.asyncio
async def test_retention_sweep_deletes_row_data_and_renders(tmp_path: Path) -> None:
    """Past the project's retention the sweep removes the batch's row data and renders
    (and says how many), and its links stay dead; a live batch keeps both."""
    async with running(tmp_path) as run:
        short = purl_rows((await run.process(  # type: ignore[arg-type]
            "acme_short_20261127_101500_00.csv", data_file(2), project="short")).purl)[0]
        keep = purl_rows((await run.process(NAME, data_file(2))).purl)[0]  # type: ignore[arg-type]
        for row in (short, keep):
            async with run.http.get(run.url(row["thumbnail_1"])) as resp:
                assert resp.status == 200
        data = tmp_path / "usa"
        assert sorted(p.name for p in (data / "rows").iterdir()) == ["batch-1.rows",
                                                                     "batch-2.rows"]
        links = run.gateway.links
        assert links is not None
        real_clock = links.clock
        links.clock = lambda: real_clock() + timedelta(days=2)
        links.index._clock = links.clock
        assert links.sweep() == (1, 1)
        assert sorted(p.name for p in (data / "rows").iterdir()) == ["batch-2.rows"]
        assert sorted(p.name for p in (data / "renders").iterdir()) == ["batch-2"]
        async with run.http.get(run.url(short["landingPage"])) as resp:
            assert resp.status == 404
        async with run.http.get(run.url(keep["landingPage"])) as resp:
            assert resp.status == 200
        assert links.sweep() == (0, 0)


@pytest.mark.asyncio
async def test_row_data_is_private_and_failed_batches_leave_none(tmp_path: Path) -> None:
    """Row data files are 0600 in a 0700 folder; a batch that fails (no usable row)
    leaves no row data and its would-be links are dead."""
    async with running(tmp_path) as run:
        await run.process(NAME, data_file(3))
        rows_dir = tmp_path / "usa" / "rows"
        assert rows_dir.stat().st_mode & 0o777 == 0o700
        assert (rows_dir / "batch-1.rows").stat().st_mode & 0o777 == 0o600
        failed = await run.process("acme_spring_20261127_111500_00.csv",
                                   b"first_name,email\r\na,b,c\r\nd,e,f\r\n")
        assert failed.state is BatchState.FAILED
        assert sorted(p.name for p in rows_dir.iterdir()) == ["batch-1.rows"]


def small_video_template(folder: Path) -> Path:
    """The default look with a short, small video, so that 50 renders fit in a test."""
    (folder / "static").mkdir(parents=True)
    (folder / "landing.html").write_text("<h1>{{ page.heading }}</h1>")
    (folder / "template.toml").write_text(
        '[page]\nheading = "Hi {{ name }}"\n'
        '[video]\nwidth = 320\nheight = 180\nfps = 10\nseconds = 2\n'
        '[[video.text]]\ntext = "Hi {{ name }}"\nsize = 24\n')
    return folder


@pytest.mark.asyncio
async def test_a_burst_of_first_views_queues_while_smtp_still_answers(tmp_path: Path) -> None:
    """50 first views of different rows' videos at once queue in the render pool and
    all get their video, while the SMTP listener on the same event loop keeps
    answering as fast as when idle."""
    folder = small_video_template(tmp_path / "tpl")
    async with running(tmp_path, project_extra=f'render.template = "{folder}"') as run:
        rows = purl_rows((await run.process(NAME, data_file(50))).purl)  # type: ignore[arg-type]
        links = run.gateway.links
        assert links is not None
        smtp = SMTP(hostname="127.0.0.1", port=run.gateway.smtp_port, timeout=10)
        await smtp.connect()
        try:
            idle = []
            for _ in range(10):
                start = time.perf_counter()
                await smtp.noop()
                idle.append(time.perf_counter() - start)
            videos = [r["landingPage"].replace("/p/", "/v/") + ".mp4" for r in rows]
            burst = asyncio.gather(*(get(run, v) for v in videos))
            during, depth = [], 0
            while not burst.done():
                depth = max(depth, links.pool.depth)
                start = time.perf_counter()
                await smtp.noop()
                during.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)
            answers = await burst
        finally:
            await smtp.quit()
        assert [r.status for r in answers] == [200] * 50
        assert len(list((tmp_path / "usa" / "renders").rglob("*.mp4"))) == 50
        assert depth > 10, "the first views waited in the pool, not on the loop"
        assert len(during) >= 10, "the burst lasted long enough to measure beside it"
        # NOOP round trips during the burst stay within what an idle listener takes,
        # plus scheduling noise: far from the seconds a blocked loop would add.
        assert statistics.median(during) < max(idle) + 0.02, (idle, during)
        assert max(during) < 0.25, sorted(during)[-5:]


@pytest.mark.asyncio
async def test_pregenerate_draws_every_thumbnail_when_the_batch_ends(tmp_path: Path) -> None:
    """A project with pregenerate = ["thumbnail"] has every row's thumbnail on disk soon
    after the batch is Done, before anyone views it."""
    async with running(tmp_path, project_extra='render.pregenerate = ["thumbnail"]') as run:
        await run.process(NAME, data_file(5))
        links = run.gateway.links
        assert links is not None
        for _ in range(200):  # the drawing task runs on the loop; wait for it to finish
            if not links._tasks:
                break
            await asyncio.gather(*links._tasks)
        assert len(list((tmp_path / "usa" / "renders").rglob("*.jpg"))) == 5


@pytest.mark.asyncio
async def test_self_signed_tls_serves_the_links(tmp_path: Path) -> None:
    """With web.self_signed the links answer over TLS with a certificate made once
    (key 0600) that a client can pin."""
    async with running(tmp_path, web_extra="self_signed = true") as run:
        outcome = await run.process(NAME, data_file(1))
        row = purl_rows(outcome.purl)[0]  # type: ignore[arg-type]
        cert = tmp_path / "usa" / "web-tls" / "cert.pem"
        assert (tmp_path / "usa" / "web-tls" / "key.pem").stat().st_mode & 0o777 == 0o600
        context = ssl.create_default_context(cafile=str(cert))
        url = f"https://localhost:{run.gateway.web_port}" + row["landingPage"].removeprefix(
            "https://purl.test")
        async with run.http.get(url, ssl=context) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with run.http.get(url, ssl=ssl.create_default_context()):
                pass


@pytest.mark.asyncio
async def test_project_template_and_sandbox(tmp_path: Path) -> None:
    """A project's own template folder is used (its text, its static file); a template
    that reaches for Python internals is stopped by the sandbox with a 500, no leak."""
    folder = tmp_path / "tpl"
    (folder / "static").mkdir(parents=True)
    (folder / "static" / "brand.css").write_text("body{color:red}")
    (folder / "template.toml").write_text('[page]\ntitle = "Offer for {{ row.city }}"\n')
    (folder / "landing.html").write_text(
        "<title>{{ page.title }}</title><link href=\"{{ static('brand.css') }}\">"
        "{% if row.first_name == 'Zoë' %}{{ ''.__class__.__mro__[1].__subclasses__() }}"
        "{% endif %}")
    async with running(tmp_path, project_extra=f'render.template = "{folder}"') as run:
        rows = purl_rows((await run.process(NAME, data_file(2))).purl)  # type: ignore[arg-type]
        async with run.http.get(run.url(rows[0]["landingPage"])) as resp:
            html = await resp.text()
            assert resp.status == 200
            assert "<title>Offer for Paris, FR</title>" in html
        css = html.split('href="', 1)[1].split('"', 1)[0]
        async with run.http.get(run.base + css) as resp:
            assert await resp.text() == "body{color:red}"
        async with run.http.get(run.base + css.replace("brand.css", "../template.toml")) as r:
            assert r.status == 404
        async with run.http.get(run.url(rows[1]["landingPage"])) as resp:
            assert resp.status == 500
            assert "class" not in await resp.text()


def test_names_cover_what_the_tests_rely_on() -> None:
    """The helper's names include an HTML injection attempt and non-ASCII names."""
    assert any("<script>" in n for n in NAMES) and any(not n.isascii() for n in NAMES)


@pytest.mark.asyncio
async def test_a_killed_render_worker_is_replaced(tmp_path: Path) -> None:
    """kill -9 of the render processes: the view in hand may get 503 with Retry-After,
    and the next one is drawn by a new pool, not refused for ever."""
    async with running(tmp_path) as run:
        rows = purl_rows((await run.process(NAME, data_file(3))).purl)  # type: ignore[arg-type]
        links = run.gateway.links
        assert links is not None
        assert (await get(run, rows[0]["thumbnail_1"])).status == 200
        workers = list(links.pool._pool._processes.values())  # type: ignore[union-attr]
        assert workers
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
        statuses = []
        for _ in range(3):
            resp = await get(run, rows[1]["thumbnail_1"])
            statuses.append(resp.status)
            if resp.status == 200:
                break
            assert resp.status == 503 and resp.headers["Retry-After"] == "5"
        assert statuses[-1] == 200, statuses


def test_the_self_signed_pair_is_made_whole_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    """The demo's self-signed pair is written atomically (no .part left, the key 0600);
    a certificate cut short is one ConfigError naming both files and what to do, never
    a traceback at every start."""
    web = WebConfig(self_signed=True)
    assert tls_context(web, tmp_path, "https://purl-usa.localhost:8443") is not None
    folder = tmp_path / "web-tls"
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]
    assert (folder / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = folder / "cert.pem"
    cert.write_bytes(cert.read_bytes()[:100])
    with pytest.raises(ConfigError) as caught:
        tls_context(web, tmp_path, "https://purl-usa.localhost:8443")
    assert caught.value.message == (
        f"web TLS: cannot load {cert} / {folder / 'key.pem'}: damaged, or not a matching "
        "certificate and key (delete both to have a new pair made)")


@pytest.mark.asyncio
async def test_every_answer_is_short_header_complete_and_names_no_version(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An encoded NUL in an asset path (once a 500 with a traceback), an unknown path
    and an unknown token get the same short 404; a wrong method a short 405; every one
    carries the security headers and a Server header without a version."""
    async with running(tmp_path) as run:
        assert run.gateway.links is not None
        key = run.gateway.links.templates["acme", "spring"].key
        answers = []
        for method, path in (("GET", f"/purl/a/{key}/style.css%00.toml"),
                             ("GET", f"/purl/a/{key}/%00"), ("GET", "/nowhere"),
                             ("GET", "/purl/p/AAAAAAAAAAAAAAAAAAAAAA"),
                             ("POST", "/purl/robots.txt"), ("GET", "/purl/robots.txt")):
            async with run.http.request(method, run.base + path) as resp:
                answers.append((resp.status, await resp.text(), dict(resp.headers)))
    assert [(status, text) for status, text, _ in answers] == [
        (404, "Not found\n"), (404, "Not found\n"), (404, "Not found\n"),
        (404, "Not found\n"), (405, "Method not allowed\n"),
        (200, "User-agent: *\nDisallow: /\n")]
    for _, _, headers in answers:
        assert headers["Server"] == "purlgate"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Robots-Tag"].startswith("noindex")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert answers[4][2]["Allow"] == "GET, HEAD"
    assert not [r for r in caplog.records if r.levelno >= 40], "no error logged"


@pytest.mark.asyncio
async def test_a_malformed_request_is_one_warning_without_its_token(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A request line or header too long, too many headers, bad UTF-8: each is refused
    and logged as one WARNING line naming the peer and the error class: no traceback,
    no path, no token."""
    secret = "SECRETTOKEN" * 3
    bad = [b"GET /purl/p/" + secret.encode() + b"x" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
           b"GET /purl/p/" + secret.encode() + b" HTTP/1.1\r\nX-Long: " + b"y" * 9000
           + b"\r\n\r\n",
           b"GET /purl/p/" + secret.encode() + b" HTTP/1.1\r\n"
           + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
           b"GET /purl/p/" + secret.encode() + b"\xff\xfe HTTP/1.1\r\nHost: \xff\r\n\r\n"]
    async with running(tmp_path) as run:
        caplog.clear()
        with caplog.at_level("DEBUG"):
            for raw in bad:
                reader, writer = await asyncio.open_connection("127.0.0.1",
                                                               run.gateway.web_port)
                writer.write(raw)
                await writer.drain()
                status = await reader.readline()
                assert status.split()[1] == b"400", status
                writer.close()
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(server) == len(bad)
    for record in server:
        assert record.levelname == "WARNING" and record.exc_info is None
        assert record.getMessage().startswith("refused a malformed HTTP request from 127.0.0.1")
    assert secret not in caplog.text


@pytest.mark.asyncio
async def test_a_render_past_its_time_limit_is_stopped_and_its_worker_replaced(
        tmp_path: Path) -> None:
    """A render that runs on is stopped at its time limit: its viewers get the 503
    error, its worker process is killed and replaced, the next render works; and
    closing the pool while a render runs returns at once (a stop never waits for it)."""
    pool = RenderPool(1, 10, timeout=1.0)
    canvas = Canvas(320, 180, "#000000", "#ffffff", (Text("x" * 10_000, 24, "#ffffff", 10, 10),))
    try:
        started = time.monotonic()
        with pytest.raises(RenderTimeoutError):
            await pool.render(draw_forever, canvas, tmp_path / "a.jpg")
        assert time.monotonic() - started < 5
        drawn = await pool.render(render_thumbnail, canvas, tmp_path / "b.jpg")
        with Image.open(drawn) as image:
            assert image.size == (320, 180), "the 10 KB value drew, cut short"
        hung = asyncio.create_task(pool.render(draw_forever, canvas, tmp_path / "c.jpg"))
        await eventually(lambda: pool.depth == 1, "a render running")
    finally:
        started = time.monotonic()
        await asyncio.to_thread(pool.close)
        assert time.monotonic() - started < 5, "close waited for a render"
    with pytest.raises((BrokenProcessPool, asyncio.CancelledError)):
        await hung


@pytest.mark.asyncio
async def test_render_processes_start_at_the_first_render_and_stop_when_idle(
        tmp_path: Path) -> None:
    """No render process before the first render; web.render_idle_seconds after the
    last one, none again (an idle region holds no renderer); the next render starts
    them anew and draws."""
    pool = RenderPool(1, 10, timeout=30.0, idle_seconds=0.5)
    canvas = Canvas(320, 180, "#000000", "#ffffff", (Text("hello", 24, "#ffffff", 10, 10),))
    try:
        assert pool.running == 0
        await pool.render(render_thumbnail, canvas, tmp_path / "a.jpg")
        assert pool.running == 1
        await eventually(lambda: pool.running == 0, "the render process stopped when idle")
        drawn = await pool.render(render_thumbnail, canvas, tmp_path / "b.jpg")
        with Image.open(drawn) as image:
            assert image.size == (320, 180)
        assert pool.running == 1
    finally:
        await asyncio.to_thread(pool.close)
    assert pool.running == 0


def test_a_long_value_is_measured_a_dozen_times_not_once_a_character() -> None:
    """A 10 KB value is cut to what a line can show before it is measured, and the fit
    is found by halving: a few measurements, where it took one per character."""
    font = _font(str(default_template_dir() / "fonts" / "DejaVuSans.ttf"), 28)
    calls = []

    class Counting:
        def getlength(self, text: str) -> float:
            calls.append(len(text))
            return float(font.getlength(text))

    fitted = _fit("Ø" * 10_000, Counting(), 600)  # type: ignore[arg-type]
    assert fitted.endswith("…") and font.getlength(fitted) <= 600
    assert len(calls) <= 12 and max(calls) <= MAX_DRAWN_CHARS + 1


@pytest.mark.asyncio
async def test_slow_and_idle_connections_are_closed(tmp_path: Path) -> None:
    """Connections that send a header byte at a time, and a keep-alive connection left
    idle after its answer, are closed by the server once idle_timeout_seconds pass."""
    async with running(tmp_path, web_extra="idle_timeout_seconds = 1") as run:
        async def slow() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", run.gateway.web_port)
            try:
                for byte in b"GET /purl/robots.txt HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                    writer.write(bytes([byte]))  # one byte each 0.2 s: 20 s for the head
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    if reader.at_eof():
                        return b"closed"
            except ConnectionError:
                return b"closed"
            finally:
                writer.close()
            return b"still open after 20 s"

        async def idle() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", run.gateway.web_port)
            writer.write(b"GET /purl/robots.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            started = time.monotonic()
            rest = await asyncio.wait_for(reader.read(), 10)  # EOF: the server closed it
            writer.close()
            return b"closed" if rest == b"" and time.monotonic() - started < 5 else rest

        results = await asyncio.gather(*(slow() for _ in range(20)), idle())
    assert results == [b"closed"] * 21


@pytest.mark.asyncio
async def test_a_batch_finished_elsewhere_is_served_and_kept(tmp_path: Path) -> None:
    """Batches another process finished on the same store and data_dir (another
    instance of the region, `purlgate process`): their links answer at once (looked up
    in the store, off the event loop), and the retention sweep keeps their row data,
    however long ago it was published, instead of taking them for never served."""
    async with running(tmp_path) as run:
        other = build_region(parse_config(make_config(tmp_path)), "usa")
        out = tmp_path / "elsewhere"
        out.mkdir()

        def process(name: str) -> Any:
            (tmp_path / name).write_bytes(data_file(2))
            return other.processor.process(Submission(
                path=tmp_path / name, received_name=name, channel="test",
                client_id="acme", project_id="spring"), out)

        first = await asyncio.to_thread(process, NAME)
        async with run.http.get(run.url(purl_rows(first.purl)[0]["landingPage"])) as resp:
            assert resp.status == 200
        second = await asyncio.to_thread(process, NAME.replace("_00.", "_01."))
        other.close()
        rows = tmp_path / "usa" / "rows" / f"batch-{second.batch.id}.rows"
        long_ago = time.time() - 7200  # published long before: "settled"
        os.utime(rows, (long_ago, long_ago))
        links = run.gateway.links
        assert links is not None
        assert await asyncio.to_thread(links.sweep) == (0, 0)
        assert rows.exists()
        async with run.http.get(run.url(purl_rows(second.purl)[0]["thumbnail_1"])) as resp:
            assert resp.status == 200
