"""The platform's render API (``storyboard-api``): one paid render per row, never two.

    POST {base}/storyboards/generate   Basic auth; storyboard_id, data [{key, val}],
                                       the outputs wanted (mp4 video, jpg thumbnail,
                                       landing page); answers check_status_url + links
    GET  check_status_url              until the render is ready or failed

Every row's progress is written to a ledger (SQLite, one row per (batch, ordinal)) as
it happens: the answer of the POST (its status URL and links) before anything else,
then its final state. A batch restarted after a crash takes done rows from the ledger,
polls rows already requested, and requests only the rows never sent. Each POST carries
an ``Idempotency-Key`` of (region, batch, ordinal), so even a crash between sending a
request and recording its answer does not pay twice with an API that honours the key.

Requests are bounded (``concurrency`` in flight, ``requests_per_second``) and retried
with exponential backoff on timeouts, connection errors, 5xx and 429 (Retry-After
honoured). A row that still fails is a row error; refused credentials (401, 403) stop
the batch (``RenderAuthError``). The core calls ``render`` from a worker thread; each
block runs on a private event loop there, never on the server's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pyarrow as pa

from purlgate.config import StoryboardConfig
from purlgate.core.render import RenderLedgerPort, RenderRequest, RenderResult, RowState
from purlgate.errors import RenderAuthError

log = logging.getLogger("purlgate.render.api")

READY = frozenset({"VIDEO_AVAILABLE", "DONE", "READY", "COMPLETED"})
FAILED = frozenset({"ERROR", "FAILED"})
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RenderLedger:
    """What the API was asked and answered, per (batch, row): survives kill -9.

    WAL with synchronous=NORMAL: a commit is in the log before ``record`` returns, so a
    killed process loses nothing; a power cut may lose the last few records, and those
    rows are asked again under the same Idempotency-Key.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS renders (batch_id INTEGER NOT NULL,"
            " ordinal INTEGER NOT NULL, state TEXT NOT NULL, check_url TEXT,"
            " thumbnail TEXT, landing_page TEXT, reason TEXT,"
            " PRIMARY KEY (batch_id, ordinal))")

    def load(self, batch_id: int, first: int, count: int) -> dict[int, RowState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ordinal, state, check_url, thumbnail, landing_page, reason FROM renders"
                " WHERE batch_id = ? AND ordinal >= ? AND ordinal < ?",
                (batch_id, first, first + count)).fetchall()
        return {r[0]: RowState(*r[1:]) for r in rows}

    def record(self, batch_id: int, ordinal: int, row: RowState) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO renders VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch_id, ordinal, row.state, row.check_url, row.thumbnail,
                 row.landing_page, row.reason))

    def forget(self, batch_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM renders WHERE batch_id = ?", (batch_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RateLimiter:
    """At most ``rate`` request starts per second, across blocks and their loops."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    async def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass(frozen=True)
class _Session:
    """One block's HTTP session and its bound on requests in flight."""

    http: aiohttp.ClientSession
    gate: asyncio.Semaphore


class _RowFailedError(Exception):
    """This row cannot be rendered; the reason becomes its row error."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _links(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(thumbnail, landing page) from a generate or status answer, where present."""
    output = body.get("output") or {}
    thumbnail = landing = None
    for item in output.get("jpg") or []:
        thumbnail = thumbnail or (item.get("links") or {}).get("url")
    for item in output.get("video") or []:
        landing = landing or (item.get("links") or {}).get("landing_page_url")
    landing = landing or (body.get("landing_page") or {}).get("url")
    return thumbnail, landing


class StoryboardRenderer:
    """One project's renders through the platform API."""

    keeps_rows = False  # the platform serves the pages
    paid = True

    def __init__(self, *, config: StoryboardConfig, password: str, storyboard_id: str,
                 fields: Mapping[str, str], region: str, ledger: RenderLedgerPort,
                 limiter: RateLimiter, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        token = base64.b64encode(f"{config.username}:{password}".encode()).decode("ascii")
        self._auth = f"Basic {token}"
        origin = urlsplit(config.base_url)
        self._origin = (origin.scheme, origin.netloc)
        self.storyboard_id = storyboard_id
        self.fields = dict(fields)
        self.region = region
        self.ledger = ledger
        self.limiter = limiter
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

    # -- the core's call ------------------------------------------------------------

    def render(self, request: RenderRequest) -> RenderResult:
        return asyncio.run(self._render_block(request))

    async def _render_block(self, request: RenderRequest) -> RenderResult:
        n = request.num_rows
        known = self.ledger.load(request.batch_id, request.first_index, n)
        values = {name: col.to_pylist() for name, col in request.columns.items()
                  if not self.fields or name in self.fields}
        thumbnails: list[str] = [""] * n
        pages: list[str] = [""] * n
        failures: dict[int, str] = {}
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_seconds)
        gate = asyncio.Semaphore(self.config.concurrency)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            api = _Session(http, gate)

            async def one(i: int) -> None:
                ordinal = request.first_index + i
                data = [{"key": self.fields.get(name, name), "val": vals[i]}
                        for name, vals in values.items()]
                try:
                    row = await self._row(api, request.batch_id, ordinal, data,
                                          known.get(ordinal))
                except _RowFailedError as exc:
                    failures[i] = str(exc)
                    return
                thumbnails[i], pages[i] = row.thumbnail or "", row.landing_page or ""
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return RenderResult(pa.array(thumbnails, pa.string()), pa.array(pages, pa.string()),
                            failures)

    # -- one row ----------------------------------------------------------------------

    async def _row(self, api: _Session, batch_id: int,
                   ordinal: int, data: list[dict[str, Any]], known: RowState | None) -> RowState:
        if known is not None and known.state == "done":
            return known
        if known is not None and known.state == "failed":
            raise _RowFailedError(known.reason or "the render failed")
        if known is None or known.check_url is None:
            body = await self._call(api, "POST", f"{self.config.base_url}"
                                    "/storyboards/generate", json_body={
                                        "storyboard_id": self.storyboard_id, "data": data,
                                        "output": {"video": [{"format": "mp4", "height": 720}],
                                                   "jpg": [{"height": 360, "time": 0}]},
                                        "landing_page": True,
                                    }, key=f"purlgate-{self.region}-{batch_id}-{ordinal}")
            thumbnail, landing = _links(body)
            check_url = body.get("check_status_url")
            if not isinstance(check_url, str):
                return self._fail(batch_id, ordinal, "the render service gave no status URL")
            known = RowState("requested", check_url, thumbnail, landing, None)
            self.ledger.record(batch_id, ordinal, known)  # before anything else can fail
        return await self._until_ready(api, batch_id, ordinal, known)

    async def _until_ready(self, api: _Session,
                           batch_id: int, ordinal: int, row: RowState) -> RowState:
        assert row.check_url is not None
        deadline = time.monotonic() + self.config.render_timeout_seconds
        while True:
            body = await self._call(api, "GET", row.check_url)
            status = str(body.get("status", "")).upper()
            thumbnail, landing = _links(body)
            thumbnail, landing = thumbnail or row.thumbnail, landing or row.landing_page
            if status in READY:
                if not thumbnail or not landing:
                    return self._fail(batch_id, ordinal,
                                      "the render service returned no thumbnail or landing page")
                done = RowState("done", row.check_url, thumbnail, landing, None)
                self.ledger.record(batch_id, ordinal, done)
                return done
            if status in FAILED:
                return self._fail(batch_id, ordinal, "the video could not be rendered for this row")
            if time.monotonic() > deadline:
                return self._fail(batch_id, ordinal, "the video was not ready in time")
            await asyncio.sleep(self.config.poll_seconds)

    def _fail(self, batch_id: int, ordinal: int, reason: str) -> RowState:
        self.ledger.record(batch_id, ordinal, RowState("failed", None, None, None, reason))
        raise _RowFailedError(reason)

    async def _call(self, api: _Session, method: str,
                    url: str, *, json_body: Any = None, key: str | None = None) -> Any:
        """One API request with rate limit, bounded concurrency and retries."""
        delay = self.config.backoff_first_seconds
        headers = {"Idempotency-Key": key} if key else {}
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) == self._origin:  # credentials go to the API only
            headers["Authorization"] = self._auth
        for attempt in range(1, self.config.max_attempts + 1):
            wait: float | None = None
            async with api.gate:
                await self.limiter.wait()
                try:
                    async with api.http.request(method, url, json=json_body, headers=headers,
                                            ssl=self._ssl) as resp:
                        if resp.status in (401, 403):
                            raise RenderAuthError(
                                f"the render API at {self.config.base_url} refused the "
                                f"credentials of {self.config.username!r} ({resp.status})")
                        if resp.status in RETRYABLE_STATUS:
                            wait = _retry_after(resp.headers.get("Retry-After"))
                            problem = f"HTTP {resp.status}"
                        elif resp.status >= 400:
                            raise _RowFailedError(
                                f"the render service refused this row (HTTP {resp.status})")
                        else:
                            try:
                                return await resp.json(content_type=None)
                            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                                problem = "an answer that is not JSON"
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                        TimeoutError) as exc:
                    problem = type(exc).__name__
            if attempt == self.config.max_attempts:
                break
            pause = wait if wait is not None else delay * (0.5 + random.random())  # noqa: S311
            log.info("render API %s: %s; attempt %d of %d, next in %.1f s", method, problem,
                     attempt, self.config.max_attempts, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.config.backoff_max_seconds)
        raise _RowFailedError(
            f"the render service did not answer after {self.config.max_attempts} attempts")


def build_storyboard_renderers(
    config: StoryboardConfig, region: str, data_dir: Path,
    ledger: RenderLedgerPort | None = None,
) -> tuple[RenderLedgerPort, RateLimiter, str, ssl.SSLContext | None]:
    """The region's shared pieces: ledger (the database's, else SQLite in ``data_dir``),
    rate limit, password, TLS trust."""
    password = config.password.reveal().decode("utf-8")
    context = None
    if config.ca_file is not None:
        context = ssl.create_default_context(cafile=str(config.ca_file))
    return (ledger or RenderLedger(data_dir / "render-ledger.sqlite3"),
            RateLimiter(config.requests_per_second), password, context)
