"""Operations over HTTP, on the region's web server: health, readiness, metrics, batches.

    GET /healthz               200 while the process runs (for a container's HEALTHCHECK)
    GET /readyz                200 or 503 with each check: listeners, disk, relay
    GET /metrics               Prometheus text format
    GET /ops/batches           the batch view (HTML): per client and project, filterable
    GET /ops/api/batches       the same as JSON
    GET /ops/batches/<id>/errors   a batch's error file, while it is on our disk

/readyz, /metrics and /ops/* answer only to the operator: from an address in
``ops_networks`` or with the ``ops_password`` (Basic auth). No row data anywhere: a
batch is its ids, names, counts, states and times. What to check and count comes from
the caller (plain callables), so this module imports no channel.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from jinja2 import Environment
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from purlgate.core.leases import Leases
from purlgate.core.lifecycle import TERMINAL, BatchEvent, BatchRecord, BatchState, RegionStore
from purlgate.errors import StorageError

log = logging.getLogger("purlgate.ops")

ReadyCheck = Callable[[], tuple[bool, str]]  # (ok, what was found)
STATES = [s.value for s in BatchState]


@dataclass(frozen=True)
class OpsAccess:
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
    user: str
    password: str | None  # None: only from ops_networks


MAX_FAILED_LOGINS = 10  # failed ops logins from one address within LOGIN_WINDOW ...
LOGIN_WINDOW = 300.0  # ... and it gets 429 until the window has passed


class LoginLimiter:
    """Failed ops logins per address: past MAX_FAILED_LOGINS in LOGIN_WINDOW seconds the
    address is refused (429) without its password being looked at, until the oldest
    failure leaves the window. Touched on the event loop only."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, peer: str) -> deque[float]:
        times = self._failures.get(peer, deque())
        cutoff = self._clock() - LOGIN_WINDOW
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            self._failures.pop(peer, None)
        return times

    def failed(self, peer: str) -> None:
        times = self._recent(peer)
        times.append(self._clock())
        self._failures[peer] = times
        if len(times) == MAX_FAILED_LOGINS:
            log.warning("ops logins from %s refused for up to %.0f s after %d failures",
                        peer, LOGIN_WINDOW, MAX_FAILED_LOGINS)

    def blocked(self, peer: str) -> bool:
        return len(self._recent(peer)) >= MAX_FAILED_LOGINS

    def wait(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        times = self._recent(peer)
        if len(times) < MAX_FAILED_LOGINS:
            return 0.0
        return max(0.0, times[0] + LOGIN_WINDOW - self._clock())


class _Families(Collector):
    """Gauges and counters read from the running pieces at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


class BatchMetrics:
    """Batch outcomes as they happen (a core subscriber; thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("purlgate_batches", "Batches that ended, by channel and status",
                               ["channel", "status"], registry=registry)
        self.rows = Counter("purlgate_rows", "Rows of ended batches, by outcome", ["outcome"],
                            registry=registry)
        self.duration = Histogram(
            "purlgate_batch_duration_seconds", "From receipt to the batch's end",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600), registry=registry)

    def __call__(self, event: BatchEvent) -> None:
        batch = event.batch
        if batch.state not in TERMINAL or batch.kind != "batch" or event.again:
            return  # a validation is not a batch; a restarted one was counted
        self.batches.labels(batch.channel, batch.state.value).inc()
        self.rows.labels("ok").inc(batch.counts.rows_ok)
        self.rows.labels("error").inc(batch.counts.rows_error)
        self.duration.observe(max(0.0, (batch.updated_at - batch.created_at).total_seconds()))


PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>purlgate {{ region }}: batches</title>
<style>body{font:14px system-ui,sans-serif;margin:1rem}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ccc;padding:.25rem .5rem;text-align:left}
.Failed{color:#b00020}.Done{color:#1b5e20}.audit{font-size:12px;word-break:break-all}</style></head><body>
<h1>Region {{ region }}: batches</h1>
<form method="get"><label>Client <input name="client" value="{{ f.client or '' }}"></label>
<label>Project <input name="project" value="{{ f.project or '' }}"></label>
<label>Status <select name="status"><option value="">any</option>
{% for s in states %}<option{% if s == f.status %} selected{% endif %}>{{ s }}</option>{% endfor %}
</select></label> <button>Filter</button></form>
<table><thead><tr><th>Batch</th><th>Client</th><th>Project</th><th>Channel</th><th>File</th>
<th>Status</th><th>Rows</th><th>OK</th><th>Errors</th><th>Received (UTC)</th><th>Took</th>
<th>Reason</th><th>Files</th><th>Instance</th><th>Audit trail</th></tr></thead><tbody>
{% for b in batches %}<tr><td>{{ b.id }}</td><td>{{ b.client }}</td><td>{{ b.project or '' }}</td>
<td>{{ b.channel }}</td><td>{{ b.file }}{% if b.kind == 'validation' %} (validation){% endif %}</td>
<td class="{{ b.status.split()[0] }}">{{ b.status }}</td>
<td>{{ b.rows }}</td><td>{{ b.rows_ok }}</td><td>{{ b.rows_error }}</td>
<td>{{ b.received_at[:19] }}</td><td>{{ '%.1f s' % b.seconds }}</td><td>{{ b.reason or '' }}</td>
<td>{{ b.outputs | join(', ') }}{% if b.error_file_url %}
 (<a href="{{ b.error_file_url }}">error file</a>){% endif %}{% if b.download %}
<br>too big for mail: <a href="{{ b.download.url }}">download link</a> until
{{ b.download.until }}{% endif %}</td>
<td>{{ b.instance or '' }}</td>
<td class="audit">{% if b.source %}from {{ b.source }}<br>{% endif %}
{% if b.sender_auth %}{{ b.sender_auth }}<br>{% endif %}
{% if b.signer %}signed by PGP key {{ b.signer }}<br>{% endif %}
{% if b.received_sha256 %}received SHA-256 {{ b.received_sha256 }}<br>{% endif %}
{% if b.purl_sha256 %}PURL file SHA-256 {{ b.purl_sha256 }}{% endif %}</td></tr>
{% else %}<tr><td colspan="15">No batches match.</td></tr>{% endfor %}
</tbody></table>
{% if instances %}<h2>Instances</h2>
<table><thead><tr><th>Instance</th><th>Last seen</th><th>Working on</th></tr></thead><tbody>
{% for i in instances %}<tr><td>{{ i.name }}</td><td>{{ '%.0f s ago' % i.seen_seconds_ago }}</td>
<td>{% for kind, key in i.leases %}{{ kind }} {{ key }}{% if not loop.last %}, {% endif %}
{% else %}nothing{% endfor %}</td></tr>{% endfor %}
</tbody></table>{% endif %}</body></html>
""")


def batch_view(batch: BatchRecord) -> dict[str, Any]:
    """A batch as operators see it: no row data, no token, no key."""
    return {
        "id": batch.id, "client": batch.client, "project": batch.project,
        "channel": batch.channel, "file": batch.data_name or batch.received_name,
        "status": batch.state.value, "rows": batch.counts.rows_total,
        "rows_ok": batch.counts.rows_ok, "rows_error": batch.counts.rows_error,
        "error_code": batch.error_code, "reason": batch.reason,
        "received_at": batch.created_at.isoformat(), "updated_at": batch.updated_at.isoformat(),
        "seconds": (batch.updated_at - batch.created_at).total_seconds(),
        "outputs": list(batch.outputs), "instance": batch.instance, "kind": batch.kind,
        "history": [{"status": s.value, "at": at.isoformat()} for s, at in batch.history],
        # The audit trail: where it came from, who the checks say sent it, the PGP key
        # that signed it, and what we received and made.
        "source": batch.source, "sender_auth": batch.sender_auth, "signer": batch.signer,
        "received_sha256": batch.sha256, "purl_sha256": batch.purl_sha256,
    }


def instances_view(leases: Leases) -> list[dict[str, Any]]:
    """The region's instances as the others see them, each with what it holds."""
    held: dict[str, list[tuple[str, str]]] = {}
    for lease in leases.held():
        if lease.expires_in >= 0:
            held.setdefault(lease.owner, []).append((lease.kind, lease.key))
    return [{"name": i.name, "seen_seconds_ago": round(i.seen_ago, 1),
             "started_at": i.started_at, "leases": held.get(i.name, [])}
            for i in leases.instances()]


class OpsRoutes:
    """Adds the operations routes to an aiohttp application."""

    def __init__(self, app: web.Application, *, region: str, store: RegionStore,
                 checks: Mapping[str, ReadyCheck], families: Callable[[], Iterable[Metric]],
                 access: OpsAccess, error_file: Callable[[BatchRecord], Path | None],
                 registry: CollectorRegistry | None = None,
                 advisory: frozenset[str] = frozenset(),
                 leases: Leases | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.region = region
        self.leases = leases  # several instances: the batch view shows them
        self.store = store
        self.checks = checks
        # Reported by /readyz but never a 503: what does not stop intake (the relay:
        # replies wait durably in the outbox).
        self.advisory = advisory
        self.access = access
        self.logins = LoginLimiter(clock)
        self.error_file = error_file
        # A reply too big for mail: its download link and until when (url, ISO time).
        # Replies too big for mail: batch id -> its download link and until when.
        self.downloads: Callable[[], Mapping[int, dict[str, str]]] = dict
        self.registry = registry or CollectorRegistry()
        self.registry.register(_Families(families))
        self.batch_metrics = BatchMetrics(self.registry)
        app.router.add_get("/healthz", self.healthz, name="healthz")
        app.router.add_get("/readyz", self.readyz, name="readyz")
        app.router.add_get("/metrics", self.metrics, name="metrics")
        app.router.add_get("/ops/batches", self.batches_page, name="ops-batches")
        app.router.add_get("/ops/api/batches", self.batches_json, name="ops-api")
        app.router.add_get("/ops/batches/{id:\\d+}/errors", self.errors_file,
                           name="ops-errors")

    # -- access -----------------------------------------------------------------------

    def _allowed(self, request: web.Request) -> bool:
        peer = request.remote or ""
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in self.access.networks):
            return True
        header = request.headers.get("Authorization", "")
        if self.access.password is None or not header.startswith("Basic "):
            return False
        if self.logins.blocked(peer):
            return False  # not even checked: a guess costs nothing but is never right
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        ok = (hmac.compare_digest(user.encode(), self.access.user.encode())
              and hmac.compare_digest(password.encode(), self.access.password.encode()))
        if not ok:
            self.logins.failed(peer)
        return ok

    def _refuse(self, request: web.Request) -> web.Response:
        wait = self.logins.wait(request.remote or "")
        if wait:
            return web.Response(status=429, text="Too many failed logins; try again later\n",
                                headers={"Cache-Control": "no-store",
                                         "Retry-After": str(int(wait) + 1)})
        headers = {"Cache-Control": "no-store"}
        if self.access.password is not None:
            headers["WWW-Authenticate"] = f'Basic realm="purlgate {self.region}"'
        return web.Response(status=401, text="Operators only\n", headers=headers)

    # -- handlers ---------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refuse(request)
        results = {}
        for name, check in self.checks.items():
            ok, detail = await asyncio.to_thread(check)
            results[name] = {"ok": ok, "detail": detail}
        ready = all(r["ok"] for name, r in results.items() if name not in self.advisory)
        return web.json_response({"ready": ready, "checks": results},
                                 status=200 if ready else 503,
                                 headers={"Cache-Control": "no-store"})

    async def metrics(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refuse(request)
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                "Cache-Control": "no-store"})

    def _filters(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        status = q.get("status") or None
        limit = q.get("limit", "200")
        return {"client": q.get("client") or None, "project": q.get("project") or None,
                "status": status if status in STATES else None,
                "limit": max(1, min(int(limit) if limit.isdigit() else 200, 1000))}

    async def _list(self, request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        f = self._filters(request)
        records = await asyncio.to_thread(self.store.search, **f)
        downloads = await asyncio.to_thread(self.downloads)
        views = []
        for record in records:
            view = batch_view(record)
            found = await asyncio.to_thread(self.error_file, record)
            view["error_file_url"] = (f"/ops/batches/{record.id}/errors"
                                      if found is not None else None)
            view["download"] = downloads.get(record.id)
            views.append(view)
        return f, views

    async def errors_file(self, request: web.Request) -> web.StreamResponse:
        if not self._allowed(request):
            return self._refuse(request)
        try:
            record = await asyncio.to_thread(self.store.get, int(request.match_info["id"]))
        except StorageError:
            return web.Response(status=404, text="No such batch\n")
        path = await asyncio.to_thread(self.error_file, record)
        if path is None:
            return web.Response(status=404, text="No error file on disk for this batch\n")
        return web.FileResponse(path, headers={
            "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{path.name}"'})

    async def batches_page(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refuse(request)
        f, batches = await self._list(request)
        instances = (await asyncio.to_thread(instances_view, self.leases)
                     if self.leases is not None else [])
        html = PAGE.render(region=self.region, f=f, states=STATES, batches=batches,
                           instances=instances)
        return web.Response(text=html, content_type="text/html", headers={
            "Cache-Control": "no-store", "X-Robots-Tag": "noindex",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    async def batches_json(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refuse(request)
        _, batches = await self._list(request)
        instances = (await asyncio.to_thread(instances_view, self.leases)
                     if self.leases is not None else [])
        return web.json_response({"region": self.region, "batches": batches,
                                  "instances": instances},
                                 headers={"Cache-Control": "no-store"})
