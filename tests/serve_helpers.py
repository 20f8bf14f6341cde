"""`purlgate serve` as a real subprocess: with a config relaying to a sink, started,
ready once it accepts mail; and the bundled configuration on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.dovecot import free_port
from tests.mail_helpers import PASSWORD, Sink, mail_config

BUNDLED = (ROOT / "src" / "purlgate" / "regions.toml").read_text()


def setup(tmp_path: Path, sink: Sink) -> tuple[Path, Path, int]:
    """A config relaying to ``sink``, a data folder and a free SMTP port."""
    cfg = tmp_path / "regions.toml"
    cfg.write_text(mail_config(sink.port))
    return cfg, tmp_path / "state", free_port()


def start(cfg: Path, data: Path, smtp: int, crash_at: str | None = None, *,
          logs: bool = False) -> subprocess.Popen[str]:
    """A `purlgate serve` subprocess; its stdout piped, or with ``logs`` its log."""
    env = {**os.environ, "PG_TEST_ACME_ZIP": PASSWORD.decode()}
    env.pop("PURLGATE_CRASH_AT", None)
    if crash_at is not None:
        env["PURLGATE_CRASH_AT"] = crash_at
    exe = str(Path(sys.executable).with_name("purlgate"))
    return subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg),
                             "--data-dir", str(data), "--smtp-port", str(smtp)],
                            stdout=subprocess.DEVNULL if logs else subprocess.PIPE,
                            stderr=subprocess.PIPE if logs else subprocess.DEVNULL,
                            text=True, env=env)


def serve(cfg: Path, data: Path, smtp: int, crash_at: str | None) -> subprocess.Popen[str]:
    """As ``start``, once it accepts mail."""
    proc = start(cfg, data, smtp, crash_at)
    assert proc.stdout is not None
    assert "accepting mail" in proc.stdout.readline()
    return proc


def config_text(ports: dict[str, int]) -> str:
    """The bundled configuration with free ports and an absolute demo secret path."""
    text = BUNDLED
    for fixed in (2222, 2232, 8443, 8453):  # SFTP and web: any free port
        text = text.replace(f"port = {fixed}\n", "port = 0\n")
    for default, port in ports.items():
        text = text.replace(f"port = {default}\n", f"port = {port}\n")
    return text.replace('{ file = "fixtures/secrets/', f'{{ file = "{ROOT}/fixtures/secrets/')
