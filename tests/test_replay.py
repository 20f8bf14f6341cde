"""QA replay: the fixture emails against running instances, as QA runs them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from purlgate.app import build_gateway, serve
from purlgate.config import parse_config
from purlgate.replay import replay
from tests.dovecot import free_port
from tests.serve_helpers import config_text

ROOT = Path(__file__).resolve().parents[1]
EMAILS = ROOT / "fixtures" / "emails"
BUNDLED = (ROOT / "src" / "purlgate" / "regions.toml").read_text()


def test_replay_cli_against_serve(tmp_path: Path) -> None:
    """`purlgate serve` and `purlgate replay --capture` as processes: every usa fixture
    passes, the table says so, a second replay at once passes too, and SIGTERM stops
    the instance cleanly."""
    smtp, relay = free_port(), free_port()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config_text({"2525": smtp, "2526": relay}))
    exe = str(Path(sys.executable).with_name("purlgate"))
    server = subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg),
                               "--data-dir", str(tmp_path / "usa")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"on 127.0.0.1:{smtp}" in banner, banner + (server.stderr.read() if
                                                            server.stderr else "")
        # Twice at once, same instance: each run gives the fixtures fresh names and
        # Message-IDs, so nothing in the second run is a duplicate of the first.
        for _ in range(2):
            result = subprocess.run(
                [exe, "replay", *sorted(map(str, EMAILS.glob("*.eml"))), "--smtp",
                 f"127.0.0.1:{smtp}", "--capture", f"127.0.0.1:{relay}", "--region", "usa",
                 "--timeout", "30"],
                capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.splitlines()[-1] == "10 passed, 0 failed"
            assert "FAIL" not in result.stdout
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.asyncio
async def test_replay_eur_region(tmp_path: Path) -> None:
    """The eur instance answers its own 20-row fixture and refuses the usa address."""
    smtp, relay = free_port(), free_port()
    config = parse_config(config_text({"2535": smtp, "2536": relay}))
    gateway = build_gateway(config, "eur", data_dir=tmp_path / "eur")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop))
    while gateway.smtp is None:
        await asyncio.sleep(0.05)
    try:
        results = await replay([EMAILS / "02_eur_happy_20_rows.eml",
                                EMAILS / "01_usa_happy_20_rows.eml"],
                               smtp=("127.0.0.1", smtp), capture=("127.0.0.1", relay),
                               manifest=EMAILS / "manifest.toml", region=None, timeout=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    by_file = {r.file: r for r in results}
    assert by_file["02_eur_happy_20_rows.eml"].ok, by_file
    usa = by_file["01_usa_happy_20_rows.eml"]
    assert not usa.ok and usa.got == "refused 550", "no relay for another region's address"


def test_fixture_emails_match_the_generator(tmp_path: Path) -> None:
    """The committed fixtures are what fixtures/make_emails.py makes (names, shapes)."""
    copy = tmp_path / "fixtures"
    shutil.copytree(ROOT / "fixtures", copy, ignore=shutil.ignore_patterns("emails"))
    subprocess.run([sys.executable, str(copy / "make_emails.py")], check=True, timeout=60)
    assert sorted(p.name for p in (copy / "emails").glob("*.eml")) == \
        sorted(p.name for p in EMAILS.glob("*.eml"))
