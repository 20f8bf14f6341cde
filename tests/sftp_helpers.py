"""A running gateway with SFTP accounts (acme: two projects, globex: flat), keys for
them, and the OpenSSH sftp client driven as people use it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from purlgate.app import Gateway, build_gateway, serve
from purlgate.config import parse_config
from purlgate.passwords import hash_password
from tests.config_builder import Raw, region_toml
from tests.mail_helpers import Sink
from tests.waiting import eventually

T = "20261127_101500"


PASSWORD = "acme sftp pass 2026"


CSV = b"first_name,email\nZo\xc3\xab,z@acme.example\nAda,a@acme.example\n"


HASH = hash_password(PASSWORD)


ZIP_PASSWORD = "acme zip 2026"


@dataclass
class Keys:
    acme: Path
    globex: Path
    acme_pub: str
    globex_pub: str
    zip_password: Path  # acme's agreed ZIP password, as a secret file


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("ssh")
    pubs = {}
    for name in ("acme", "globex"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        (root / name).write_bytes(key.export_private_key())
        (root / name).chmod(0o600)
        pubs[name] = key.export_public_key().decode().strip()
    (root / "acme-zip").write_text(ZIP_PASSWORD + "\n")
    return Keys(root / "acme", root / "globex", pubs["acme"], pubs["globex"],
                root / "acme-zip")


def config(keys: Keys, relay: int, safelist: str = "", complete_on: str = "close") -> str:
    return region_toml(
        relay={"port": relay, "operator": "ops@idomoo.example"},
        processing={"retry_seconds": 0.1}, sftp={"port": 0, "login_timeout_seconds": 2},
        sftp__defender={"threshold": 6, "safelist": Raw(f"[{safelist}]")}) + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
zip_password = {{ file = "{keys.zip_password}" }}
[clients.acme.sftp]
username = "acme"
complete_on = "{complete_on}"
password_hash = "{HASH}"
authorized_keys = ["{keys.acme_pub}"]
[clients.acme.projects.spring]
[clients.acme.projects.autumn]

[clients.globex]
name = "Globex"
regions = ["usa"]
[clients.globex.sftp]
username = "globex"
authorized_keys = ["{keys.globex_pub}"]
flat = true
[clients.globex.projects.main]
"""


@dataclass
class Running:
    gateway: Gateway
    data_dir: Path
    stop: asyncio.Event
    task: asyncio.Task[None]
    sink: Sink

    @property
    def port(self) -> int:
        return self.gateway.sftp_port

    def downloads(self, project: str = "spring") -> Path:
        return self.data_dir / "sftp" / "acme" / project / "Downloads"

    def uploads(self, project: str = "spring") -> Path:
        return self.data_dir / "sftp" / "acme" / project / "Uploads"

    async def wait_for(self, path: Path, timeout: float = 30) -> Path:
        await eventually(path.exists, f"{path.name} appears", timeout=timeout)
        return path

    def connect(self, user: str = "acme", key: Path | None = None,
                password: str | None = None) -> object:
        return asyncssh.connect("127.0.0.1", self.port, username=user, known_hosts=None,
                                client_keys=[str(key)] if key else None, password=password,
                                agent_path=None)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        await self.sink.stop()


async def start(tmp_path: Path, keys: Keys, *, data_dir: Path | None = None,
                safelist: str = "", complete_on: str = "close") -> Running:
    sink = await Sink().start()
    data_dir = data_dir or tmp_path / "state"
    gateway = build_gateway(parse_config(config(keys, sink.port, safelist, complete_on)), "usa",
                            data_dir=data_dir)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop, lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 10)
    return Running(gateway, data_dir, stop, task, sink)


@pytest_asyncio.fixture
async def running(tmp_path: Path, keys: Keys) -> AsyncIterator[Running]:
    r = await start(tmp_path, keys)
    yield r
    await r.shutdown()


def openssh(r: Running, commands: str, *, key: Path | None = None,
            password: str | None = None, user: str = "acme") -> subprocess.CompletedProcess[str]:
    sftp = shutil.which("sftp")
    assert sftp, "the OpenSSH sftp client is needed (openssh-client)"
    args = [sftp, "-b", "-", "-P", str(r.port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if key is not None:
        args += ["-i", str(key), "-o", "PasswordAuthentication=no", "-o", "IdentitiesOnly=yes"]
    else:
        sshpass = shutil.which("sshpass")
        assert sshpass, "sshpass is needed"
        # -b implies BatchMode=yes (no password prompt); an earlier -o wins for ssh.
        args = [sshpass, "-p", password or "", args[0], "-o", "BatchMode=no", *args[1:],
                "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
    return subprocess.run([*args, f"{user}@127.0.0.1"], input=commands, text=True,
                          capture_output=True, timeout=60, check=False,
                          env={**os.environ, "SSH_AUTH_SOCK": ""})
