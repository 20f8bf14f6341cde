"""The region's HTTP server (aiohttp): what a PURL file's links serve.

    GET /p/<token>          the row's landing page (project template, sandboxed Jinja)
    GET /t/<token>.jpg      the row's thumbnail, drawn on first view, then cached
    GET /v/<token>.mp4      the row's video (H.264), rendered on first view, then cached
    GET /a/<key>/<file>     a template's static files
    GET /robots.txt         nothing here is for indexing

All under the path of ``public_base_url``. Every unknown, malformed, forged or expired
token gets the same 404. Media are drawn in a bounded process pool, so a burst of first
views queues there while the event loop (and every listener on it) stays free. It reads
the batch store and the row store; it imports no channel, and no channel imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import ssl
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from jinja2 import TemplateError

from purlgate.config import WebConfig
from purlgate.core.lifecycle import BatchEvent, BatchState, BatchSummary
from purlgate.downloads import Downloads
from purlgate.errors import RenderBusyError, RenderTimeoutError, StorageError
from purlgate.rowstore import ArrowRowStore
from purlgate.web.hot_cache import HOT_BYTES, HOT_SECONDS, Hot, HotCache
from purlgate.web.links import BatchIndex, Link
from purlgate.web.media import render_thumbnail, render_video
from purlgate.web.render_pool import RenderPool
from purlgate.web.templates import Template

log = logging.getLogger("purlgate.web")

SWEEP_SECONDS = 3600.0
SETTLE_SECONDS = 3600.0
PAGE_CSP = ("default-src 'none'; img-src 'self'; media-src 'self'; style-src 'self'; "
            "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COMMON_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow, noarchive",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
NOT_FOUND = "Not found\n"
SERVER_NAME = "purlgate"  # no version: it only helps an attacker


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a long line, too many headers, bad
    UTF-8) at ERROR with a traceback and the request line, which can hold a real token:
    one WARNING line instead, naming the peer and the kind of error only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "refused a malformed HTTP request from %s (%s)"
            record.args = (peer, type(exc).__name__)
            record.exc_info = record.exc_text = None
        return True


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")
_AIOHTTP_SERVER_LOG.addFilter(_MalformedRequests())


class _AccessLogger(AbstractAccessLogger):
    """One line per request without the token: route kind, status, time."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)  # else aiohttp skips the call

    def log(self, request: web.BaseRequest, response: web.StreamResponse,
            time: float) -> None:
        kind = None
        # A request refused before routing (malformed) has no match: aiohttp asserts.
        with contextlib.suppress(AssertionError, AttributeError):
            kind = request.match_info.route.name if isinstance(request, web.Request) else None
        self.logger.debug("http %s %s -> %d in %.1f ms", request.method, kind or "-",
                          response.status, time * 1000)


def _headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**COMMON_HEADERS, **(extra or {})}


@web.middleware
async def _uniform_errors(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """What the router answers for itself (no route, a wrong method) is as short as our
    own answers: an unknown path gets the same 404 as an unknown token."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return LinkServer.not_found()
    except web.HTTPMethodNotAllowed as exc:
        return web.Response(status=405, text="Method not allowed\n", headers=_headers({
            "Allow": ", ".join(sorted(exc.allowed_methods)), "Cache-Control": "no-store"}))


async def _harden(request: web.Request, response: web.StreamResponse) -> None:
    """Every response of the web port (links and operations) carries the security
    headers (a handler's own CSP and caching stay) and names no software version."""
    response.headers["Server"] = SERVER_NAME
    for name, value in COMMON_HEADERS.items():
        response.headers.setdefault(name, value)


class LinkServer:
    """Serves a region's links; ``app`` is the aiohttp application to mount or run."""

    def __init__(
        self, *, public_base_url: str, index: BatchIndex, rows: ArrowRowStore,
        templates: Mapping[tuple[str, str], Template], pregenerate: Mapping[
            tuple[str, str], tuple[str, ...]],
        cache_dir: Path, pool: RenderPool, clock: Callable[[], datetime],
        downloads: Downloads | None = None,
    ) -> None:
        self.index = index
        self.downloads = downloads  # replies too big for mail, each behind its own link
        self.rows = rows
        self.templates = templates
        self.pregenerate_of = pregenerate
        self.cache_dir = cache_dir
        self.pool = pool
        self.clock = clock
        self.prefix = urlsplit(public_base_url).path.rstrip("/")
        self._assets = {t.key: t for t in templates.values()}
        self.hot = HotCache(HOT_BYTES)
        self._tasks: set[asyncio.Task[int]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.chmod(0o700)
        self.app = web.Application(middlewares=[_uniform_errors])
        self.app.on_response_prepare.append(_harden)
        p = self.prefix
        self.app.router.add_get(p + "/p/{token}", self.page, name="page")
        self.app.router.add_get(p + "/t/{token}.jpg", self.thumbnail, name="thumbnail")
        self.app.router.add_get(p + "/v/{token}.mp4", self.video, name="video")
        self.app.router.add_get(p + "/a/{key}/{path:.+}", self.asset, name="asset")
        self.app.router.add_get(p + "/robots.txt", self.robots, name="robots")
        self.app.router.add_get(p + "/d/{token}", self.download, name="download")

    # -- responses ------------------------------------------------------------------

    @staticmethod
    def not_found() -> web.Response:
        return web.Response(status=404, text=NOT_FOUND, headers=_headers(
            {"Cache-Control": "no-store"}))

    async def _resolve(self, token: str) -> Link | None:
        """The token's link; a batch finished by another instance (or process) is looked
        up in the store off the event loop. The store unreachable: 503, not a 404 (the
        link may well be good)."""
        link, ask = self.index.lookup(token)
        if ask is not None:
            try:
                await asyncio.to_thread(self.index.learn, ask)
            except StorageError as exc:
                log.warning("links: the batch store cannot be read (%s); answering 503",
                            exc.message)
                raise web.HTTPServiceUnavailable(
                    text="This link cannot be checked right now; try again shortly\n",
                    headers=_headers({"Cache-Control": "no-store", "Retry-After": "5"}),
                ) from exc
            link, _ = self.index.lookup(token)
        return link

    def _max_age(self, link: Link) -> int:
        left = (link.batch.expires_at - self.clock()).total_seconds()
        return max(0, min(int(left), 365 * 24 * 3600))

    def _file(self, path: Path, link: Link, content_type: str) -> web.FileResponse:
        # The render of a row never changes while its link lives: cache it that long.
        return web.FileResponse(path, headers=_headers({
            "Content-Type": content_type,
            "Cache-Control": f"public, max-age={self._max_age(link)}, immutable",
        }))

    def _row(self, link: Link) -> dict[str, str] | None:
        return self.rows.lookup(link.batch.id, link.ordinal)

    def _template(self, link: Link) -> Template | None:
        return self.templates.get((link.batch.client, link.batch.project))

    def cache_path(self, link: Link, template: Template, suffix: str) -> Path:
        return (self.cache_dir / f"batch-{link.batch.id}"
                / f"{link.ordinal}-{template.key}{suffix}")

    # -- handlers -------------------------------------------------------------------

    def _hot_answer(self, request: web.Request, hot: Hot) -> web.Response:
        if request.headers.get("If-None-Match") == hot.etag:
            return web.Response(status=304, headers=hot.headers)
        return web.Response(body=hot.body, headers=hot.headers)

    def _keep(self, key: tuple[str, str], link: Link, body: bytes,
              headers: dict[str, str]) -> Hot:
        until = min(link.batch.expires_at, self.clock() + timedelta(seconds=HOT_SECONDS))
        etag = f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"'
        hot = Hot(body, {**headers, "ETag": etag}, etag, until)
        self.hot.put(key, hot)
        return hot

    async def page(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        hot = self.hot.get(("p", token), self.clock())
        if hot is not None:
            return self._hot_answer(request, hot)
        link = await self._resolve(token)
        row = self._row(link) if link is not None else None
        template = self._template(link) if link is not None else None
        if link is None or row is None or template is None:
            return self.not_found()
        base = self.prefix
        try:
            html = template.page_html(
                template.resolve(row), row=row, video_url=f"{base}/v/{token}.mp4",
                thumbnail_url=f"{base}/t/{token}.jpg", static_url=f"{base}/a/{template.key}",
            )
        except TemplateError as exc:  # the sandbox refused it, or the template is broken
            # No traceback: its frames and message could carry the row's values.
            log.error("template %s of client %s project %s failed: %s",  # noqa: TRY400
                      template.key, link.batch.client, link.batch.project, type(exc).__name__)
            return web.Response(status=500, text="This page cannot be shown right now\n",
                                headers=_headers({"Cache-Control": "no-store"}))
        hot = self._keep(("p", token), link, html.encode("utf-8"), _headers({
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": PAGE_CSP, "Cache-Control": "private, max-age=300"}))
        return self._hot_answer(request, hot)

    async def _media(self, request: web.Request, kind: str) -> web.StreamResponse:
        token = request.match_info["token"]
        if kind == "thumbnail":
            hot = self.hot.get(("t", token), self.clock())
            if hot is not None:
                return self._hot_answer(request, hot)
        link = await self._resolve(token)
        template = self._template(link) if link is not None else None
        if link is None or template is None:
            return self.not_found()
        suffix, content_type = (".jpg", "image/jpeg") if kind == "thumbnail" else (
            ".mp4", "video/mp4")
        path = self.cache_path(link, template, suffix)
        if not path.is_file():
            try:
                rendered = await self.render(link, template, kind)
            except (RenderBusyError, BrokenProcessPool):
                return web.Response(status=503, text="Busy, try again shortly\n",
                                    headers=_headers({"Retry-After": "5",
                                                      "Cache-Control": "no-store"}))
            except Exception as exc:  # noqa: BLE001 - a drawing error must not leak a row
                log.error("drawing the %s of batch %d failed: %s", kind,  # noqa: TRY400
                          link.batch.id, type(exc).__name__)
                return web.Response(status=500, text="This file cannot be shown right now\n",
                                    headers=_headers({"Cache-Control": "no-store"}))
            if rendered is None:
                return self.not_found()
        if kind == "thumbnail":  # small: kept in memory; videos stream from disk (Range)
            body = await asyncio.to_thread(path.read_bytes)
            hot = self._keep(("t", token), link, body, _headers({
                "Content-Type": content_type,
                "Cache-Control": f"public, max-age={self._max_age(link)}, immutable"}))
            return self._hot_answer(request, hot)
        return self._file(path, link, content_type)

    async def render(self, link: Link, template: Template, kind: str) -> Path | None:
        """Draw one row's thumbnail or video into the cache (None: no such row)."""
        row = self._row(link)
        if row is None:
            return None
        resolved = template.resolve(row)
        if kind == "thumbnail":
            return await self.pool.render(render_thumbnail, resolved.thumbnail,
                                          self.cache_path(link, template, ".jpg"))
        return await self.pool.render(render_video, resolved.video,
                                      self.cache_path(link, template, ".mp4"))

    async def thumbnail(self, request: web.Request) -> web.StreamResponse:
        return await self._media(request, "thumbnail")

    async def video(self, request: web.Request) -> web.StreamResponse:
        return await self._media(request, "video")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        template = self._assets.get(request.match_info["key"])
        if template is None:
            return self.not_found()
        root = template.static.resolve()
        try:
            path = (root / request.match_info["path"]).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long: not a file of ours
            found = False
        if not found:
            return self.not_found()
        return web.FileResponse(path, headers=_headers(
            {"Cache-Control": "public, max-age=31536000, immutable"}))

    async def download(self, request: web.Request) -> web.StreamResponse:
        """A reply's ZIP that was too big for mail, while its link lasts; else the 404
        of any unknown link."""
        found = (await asyncio.to_thread(self.downloads.find, request.match_info["token"])
                 if self.downloads is not None else None)
        if found is None:
            return self.not_found()
        kept, path = found
        return web.FileResponse(path, headers=_headers({
            "Content-Type": "application/zip", "Cache-Control": "private, no-store",
            "Content-Disposition": f'attachment; filename="{_ascii(kept.name)}"'}))

    async def robots(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="User-agent: *\nDisallow: /\n", headers=_headers())

    # -- batches coming and going ---------------------------------------------------

    def on_batch_event(self, event: BatchEvent) -> None:
        """Core subscriber (runs in the batch's thread): a finished batch's links answer
        at once, and the project's media are drawn ahead when it asks for that."""
        batch = event.batch
        if batch.state not in (BatchState.DONE, BatchState.DONE_WITH_ERRORS) \
                or batch.kind != "batch":
            return  # a validation makes no links
        self.index.add(BatchSummary(batch.id, batch.client, batch.project or "",
                                    batch.created_at, batch.updated_at))
        kinds = self.pregenerate_of.get((batch.client, batch.project or ""), ())
        if kinds and self._loop is not None and not event.again:
            self._loop.call_soon_threadsafe(self._start_pregenerate, batch.id, kinds)

    def _start_pregenerate(self, batch_id: int, kinds: tuple[str, ...]) -> None:
        task = asyncio.get_running_loop().create_task(self.pregenerate(batch_id, kinds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def pregenerate(self, batch_id: int, kinds: tuple[str, ...]) -> int:
        """Draw every row's media of a batch, one at a time (first views go between)."""
        batch = next((b for b in self.index.batches() if b.id == batch_id), None)
        if batch is None:
            return 0
        template = self.templates.get((batch.client, batch.project))
        if template is None:
            return 0
        done = 0
        for ordinal in range(self.rows.row_count(batch_id)):
            link = Link(batch, ordinal)
            for kind in kinds:
                suffix = ".jpg" if kind == "thumbnail" else ".mp4"
                if not self.cache_path(link, template, suffix).is_file():
                    done += await self._draw_ahead(link, template, kind)
        log.info("batch %d: %d media drawn ahead", batch_id, done)
        return done

    async def _draw_ahead(self, link: Link, template: Template, kind: str) -> int:
        """One row's media drawn ahead, waiting its turn while first views fill the
        queue; 0 when it cannot be drawn in time (a first view will try again)."""
        while True:
            try:
                await self.render(link, template, kind)
            except (RenderTimeoutError, BrokenProcessPool):
                log.warning("batch %d: a %s could not be drawn ahead", link.batch.id, kind)
                return 0
            except RenderBusyError:
                await asyncio.sleep(1.0)  # first views have the queue; wait a turn
            else:
                return 1

    def sweep(self) -> tuple[int, int]:
        """Delete the row data and renders of batches past retention (or never served).
        The index is brought up to date first: a batch another instance finished since
        this one last looked is live, not "never served"."""
        self.index.refresh()
        now = self.clock()
        live = {b.id: b for b in self.index.batches()}
        on_disk = set(self.rows.batch_ids()) | {
            int(p.name.removeprefix("batch-")) for p in self.cache_dir.glob("batch-*")
            if p.name.removeprefix("batch-").isdigit()}
        rows = renders = 0
        for batch_id in sorted(on_disk):
            batch = live.get(batch_id)
            if batch is not None and batch.expires_at > now:
                continue
            if batch is None and not self._settled(batch_id):
                continue  # published a moment before its batch is Done
            rows += self.rows.delete(batch_id)
            folder = self.cache_dir / f"batch-{batch_id}"
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                renders += 1
            self.index.forget(batch_id)
        if rows or renders:
            log.info("retention: removed the row data of %d and the renders of %d batch(es)",
                     rows, renders)
        if self.downloads is not None and (expired := self.downloads.sweep()):
            log.info("retention: removed %d download(s) past their time", expired)
        return rows, renders

    def _settled(self, batch_id: int) -> bool:
        """True when a batch absent from the index will never serve links: its row
        data is older than any batch takes between publishing it and being Done."""
        path = self.rows.path_of(batch_id)
        try:
            age = self.clock().timestamp() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > SETTLE_SECONDS

    async def run_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.sweep)
            except StorageError as exc:  # nothing deleted; the next round tries again
                log.warning("retention: the batch store cannot be read (%s); swept nothing",
                            exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.pool.close)


def retention_of(projects: Mapping[tuple[str, str], int]) -> Callable[[str, str], timedelta]:
    """Retention by (client, project); a batch of a project no longer configured: 0."""
    return lambda client, project: timedelta(days=projects.get((client, project), 0))


async def start_web(server: LinkServer, config: WebConfig,
                    ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
    """Bind the HTTP listener; returns the runner (to clean up) and the bound port."""
    server.bind_loop(asyncio.get_running_loop())
    # keepalive_timeout also runs from a connection's start, and closes a connection whose
    # next request's headers are not complete by then (one byte every few seconds).
    runner = web.AppRunner(server.app, access_log_class=_AccessLogger,
                           access_log=logging.getLogger("purlgate.web.access"),
                           shutdown_timeout=5.0, keepalive_timeout=config.idle_timeout_seconds)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
    await site.start()
    port = 0
    for address in runner.addresses:
        port = int(address[1])
        break
    return runner, port


def _ascii(name: str) -> str:
    """A file name safe inside a quoted Content-Disposition (ours: ASCII already)."""
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                   for c in name)
