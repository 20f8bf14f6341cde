"""A running region with its web side, and a batch processed into it, for the web tests."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from purlgate.app import Gateway, build_gateway, serve
from purlgate.config import parse_config
from purlgate.core.pipeline import BatchOutcome, Submission
from purlgate.renderers.embedded import decode
from tests.config_builder import region_toml

WEB_CLIENTS = """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data@acme.example"]

[clients.acme.projects.spring]
keep_all_columns = true
{project_extra}

[clients.acme.projects.short]
retention_days = 1
"""

NAMES = ["José", "Zoë", "<script>alert(1)</script>", "Ana María", "Łukasz", "Ørjan"]


def data_file(rows: int, *, header: str = "first_name,email,city") -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(header.split(","))
    for i in range(rows):
        w.writerow([NAMES[i % len(NAMES)], f"user{i}@acme.example", "Paris, FR"])
    return out.getvalue().encode("utf-8")


def purl_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def path_of(link: str) -> str:
    """The local path of a link (https://purl.test/purl/p/<token> -> /purl/p/<token>)."""
    return link.removeprefix("https://purl.test")


@dataclass
class Running:
    gateway: Gateway
    tmp: Path
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.web_port}"

    def url(self, link: str) -> str:
        return self.base + path_of(link)

    async def process(self, name: str, data: bytes, project: str = "spring", *,
                      channel: str = "test", out: Path | None = None) -> BatchOutcome:
        source = self.tmp / "in" / name
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(data)
        out = out or self.tmp / "out"
        out.mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(
            self.gateway.region.processor.process,
            Submission(path=source, received_name=name, channel=channel, client_id="acme",
                       project_id=project), out)

    def ordinal(self, link: str) -> int:
        token = link.rsplit("/", 1)[1].split(".", maxsplit=1)[0]
        decoded = decode(self.gateway.region.token_key, token)
        assert decoded is not None
        return decoded[1]


def make_config(tmp: Path, *, web_extra: str = "", project_extra: str = "",
                relay: int = 9, tail: str = "") -> str:
    """Region usa (links under /purl) with acme's projects; ``web_extra`` and
    ``project_extra``: TOML lines for [regions.usa.web] and acme's spring project."""
    return region_toml(data_dir=str(tmp / "usa"), public_base_url="https://purl.test/purl",
                       smtp={"port": 0}, relay={"port": relay},
                       web=f"port = 0\n{web_extra}") + WEB_CLIENTS.format(
        project_extra=project_extra) + tail


@asynccontextmanager
async def running(tmp: Path, **extra: Any) -> AsyncIterator[Running]:
    config = parse_config(make_config(tmp, **extra))
    gateway = build_gateway(config, "usa")
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop, lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        async with aiohttp.ClientSession() as http:
            yield Running(gateway, tmp, http)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
