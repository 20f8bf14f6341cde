"""A fake of the platform's render API, for contract tests and local runs.

An aiohttp application that speaks the same protocol as the real API (Basic auth,
``POST /storyboards/generate``, ``GET /jobs/<id>/status``) and can be told to answer
slowly, fail a given row, answer 429 (with Retry-After) or 500, take several polls to
finish, and refuse the credentials. It counts, per row (the request's
``Idempotency-Key``), how many requests arrived and how many renders it started: a
render is paid once per key, as an API that honours idempotency keys would.

    python -m purlgate.renderers.storyboard_fake --port 8900   # for a local run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeBehaviour:
    username: str = "purlgate"
    password: str = "secret"  # noqa: S105 - the fake's own demo credential
    delay_seconds: float = 0.0  # before every answer
    polls_until_ready: int = 1  # status checks that say "in process" first
    fail_values: frozenset[str] = frozenset()  # a row holding any of these values fails
    throttle_first: int = 0  # the first N requests get 429
    retry_after: str = "0"
    error_first: int = 0  # then the next N requests get 500
    refuse_auth: bool = False


@dataclass
class _Job:
    key: str
    values: dict[str, str]
    fails: bool
    polls: int = 0


@dataclass
class FakeStoryboardApi:
    """The app and what it saw; ``base_url`` is set by ``start``."""

    behaviour: FakeBehaviour = field(default_factory=FakeBehaviour)
    requests: Counter[str] = field(default_factory=Counter)  # generate calls per row key
    renders: Counter[str] = field(default_factory=Counter)  # renders started (paid) per key
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> data sent
    status_calls: int = 0
    base_url: str = ""
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _by_key: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _seen: int = 0
    _runner: web.AppRunner | None = None
    generated: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/storyboards/generate", self._generate)
        app.router.add_get("/jobs/{id}/status", self._status)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeStoryboardApi:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{bound[0]}:{bound[1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _gate(self, request: web.Request) -> web.Response | None:
        """Auth, delay and the scripted faults; None when the request goes through."""
        b = self.behaviour
        if b.delay_seconds:
            await asyncio.sleep(b.delay_seconds)
        expected = base64.b64encode(f"{b.username}:{b.password}".encode()).decode()
        if b.refuse_auth or request.headers.get("Authorization") != f"Basic {expected}":
            return web.json_response({"error": "unauthorized"}, status=401)
        self._seen += 1
        if self._seen <= b.throttle_first:
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": b.retry_after})
        if self._seen <= b.throttle_first + b.error_first:
            return web.json_response({"error": "internal"}, status=500)
        return None

    def _links(self, job_id: str) -> dict[str, Any]:
        cdn = "https://cdn.fake-render.example"
        return {"video": [{"links": {"url": f"{cdn}/v/{job_id}.mp4",
                                     "landing_page_url": f"{cdn}/lp/{job_id}"}}],
                "jpg": [{"links": {"url": f"{cdn}/t/{job_id}.jpg"}}]}

    async def _generate(self, request: web.Request) -> web.Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        body = await request.json()
        key = request.headers.get("Idempotency-Key") or f"anonymous-{next(self._ids)}"
        self.requests[key] += 1
        values = {str(d["key"]): str(d["val"]) for d in body.get("data", [])}
        job_id = self._by_key.get(key)
        if job_id is None:  # a new render: paid
            job_id = str(next(self._ids))
            self._by_key[key] = job_id
            self._jobs[job_id] = _Job(key, values,
                                      bool(self.behaviour.fail_values & set(values.values())))
            self.renders[key] += 1
            self.rows[key] = values
            self.generated.set()
        return web.json_response({
            "check_status_url": f"{self.base_url}/jobs/{job_id}/status",
            "output": self._links(job_id),
        })

    async def _status(self, request: web.Request) -> web.Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        self.status_calls += 1
        job = self._jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "no such job"}, status=404)
        job.polls += 1
        if job.polls < self.behaviour.polls_until_ready:
            return web.json_response({"status": "IN_PROCESS"})
        if job.fails:
            return web.json_response({"status": "ERROR"})
        return web.json_response({"status": "VIDEO_AVAILABLE",
                                  "output": self._links(request.match_info["id"])})


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake render API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--polls", type=int, default=1)
    args = parser.parse_args()

    async def run() -> None:
        api = FakeStoryboardApi(FakeBehaviour(delay_seconds=args.delay,
                                              polls_until_ready=args.polls))
        await api.start(args.host, args.port)
        print(f"fake render API on {api.base_url} (user purlgate, password secret)",
              flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
