"""Several real `purlgate serve` processes of one region: one PostgreSQL (pg_helpers), one
shared data folder, their own ports; mail through a relay sink, uploads over SFTP."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

from tests.config_builder import region_toml
from tests.dovecot import free_port
from tests.mail_helpers import PASSWORD, Captured, Sink, reply_zip

SENDER = "data-team@acme.example"
INBOUND = "sftp-usa@idomoo.com"


def config(relay_port: int, acme_key: str, *, lease_seconds: float = 3,
           render_api: str | None = None) -> str:
    """Region usa on the database of $PURLGATE_DATABASE_URL: mail and SFTP for acme, the
    links' web side, and short leases (a dead instance's work is taken over in seconds).
    ``render_api``: acme's project renders with the (fake) render API at this URL."""
    tables: dict[str, Any] = {}
    project = ""
    if render_api is not None:
        tables["storyboard"] = {
            "base_url": render_api, "username": "purlgate",
            "password": {"env": "PG_TEST_RENDER_PASSWORD"}, "concurrency": 4,
            "requests_per_second": 500, "timeout_seconds": 5, "poll_seconds": 0.01,
            "backoff_first_seconds": 0.01, "backoff_max_seconds": 0.05}
        project = ('render.backend = "storyboard-api"\nrender.storyboard_id = "8801"\n'
                   'render.fields = { first_name = "FirstName", email = "Email" }\n')
    return region_toml(
        smtp={"port": 0}, relay={"host": "127.0.0.1", "port": relay_port,
                                 "retry_first_seconds": 0.2, "operator": "ops@idomoo.example"},
        processing={"retry_seconds": 0.2}, sftp={"port": 0}, web={"port": 0},
        database={"url": {"env": "PURLGATE_DATABASE_URL"}, "lease_seconds": lease_seconds},
        **tables,
    ) + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["{SENDER}"]
notify = ["campaigns@acme.example"]
zip_password = {{ env = "PG_TEST_ACME_ZIP" }}
[clients.acme.sftp]
username = "acme"
authorized_keys = ["{acme_key}"]
[clients.acme.projects.spring]
{project}"""


@dataclass
class Instance:
    """One `purlgate serve --instance NAME` subprocess and the ports it announced."""

    name: str
    proc: subprocess.Popen[str]
    log: Path  # its stderr (a file: a pipe nobody reads would block it once full)
    smtp: int = 0
    sftp: int = 0
    web: int = 0

    @classmethod
    async def start(cls, name: str, cfg: Path, data: Path, database_url: str,
                    **env: str) -> Instance:
        exe = str(Path(sys.executable).with_name("purlgate"))
        environ = {**os.environ, "PG_TEST_ACME_ZIP": PASSWORD.decode(),
                   "PURLGATE_DATABASE_URL": database_url, **env}
        environ.pop("PURLGATE_CRASH_AT", None)
        log = cfg.with_name(f"{name}.log")
        with log.open("a") as err:
            proc = subprocess.Popen(
                [exe, "serve", "--region", "usa", "--config", str(cfg), "--data-dir",
                 str(data), "--smtp-port", str(free_port()), "--instance", name,
                 "--log-format", "json"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=environ)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line, f"instance {name} did not start: {log.read_text()}"
        banner = json.loads(line)
        assert banner["event"] == "ready", banner
        return cls(name, proc, log, banner["smtp_port"], banner["sftp_port"],
                   banner["web_port"])

    def kill(self) -> None:
        """kill -9, as a power cut or the OOM killer would (its children follow it)."""
        self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    async def stop(self) -> str:
        """SIGTERM, and its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        await asyncio.to_thread(self.proc.communicate, None, 60)
        return self.log.read_text()


def replies_by_parent(sink: Sink) -> dict[str, set[str]]:
    """Each answered message (its Message-ID) -> the Message-IDs of its replies."""
    found: dict[str, set[str]] = {}
    for captured in sink.to(SENDER):
        parent = str(captured.message["In-Reply-To"])
        found.setdefault(parent, set()).add(str(captured.message["Message-ID"]))
    return found


def links_of(captured: Captured) -> list[str]:
    """The landing-page links of a reply's PURL file."""
    files = reply_zip(captured)
    purl = next(data for name, data in files.items() if "PURL" in name.upper())
    return [row["landingPage"] for row in csv.DictReader(io.StringIO(purl.decode()))]


async def answers(web_port: int, link: str) -> int:
    path = link.removeprefix("https://purl.test")
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{web_port}{path}") as response:
        await response.read()
        return response.status


async def upload(port: int, key: Path, name: str, data: bytes) -> None:
    async with asyncssh.connect("127.0.0.1", port, username="acme", known_hosts=None,
                                client_keys=[str(key)], agent_path=None) as conn, \
            conn.start_sftp_client() as sftp, \
            sftp.open(f"/spring/Uploads/{name}", "wb") as f:
        await f.write(data)


def batches(cfg: Path, data: Path, database_url: str) -> dict[str, Any]:
    """`purlgate batches --json` as an operator runs it beside the instances."""
    exe = str(Path(sys.executable).with_name("purlgate"))
    done = subprocess.run(
        [exe, "batches", "--region", "usa", "--config", str(cfg), "--data-dir", str(data),
         "--json", "--limit", "2000"], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PURLGATE_DATABASE_URL": database_url})
    found: dict[str, Any] = json.loads(done.stdout)
    return found
