"""Poison entries: retried while running, then dead-lettered with one client answer and
one (rate-limited) operator alert; the queue moves on. Real SMTP listener and relay sink;
the scheduler's order and back-off are also pinned on their own."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio

import purlgate.channels.queue_worker as queue_module
from purlgate.app import build_gateway, serve
from purlgate.channels.queue_worker import QueueWorker
from purlgate.cli import main
from purlgate.config import parse_config
from purlgate.errors import ConfigError, StorageError
from tests.config_builder import Raw, region_toml
from tests.mail_helpers import INBOUND, PASSWORD, SENDER, Sink, aes_zip, client_mail, drained, rows
from tests.waiting import eventually

OPS = "ops@idomoo.example"
NOPW = "files@nopw.example"
NAME = "acme_spring_20261127_101500_00"
CONFIG = region_toml(
    data_dir="{data_dir}", smtp={"port": 0},
    relay={"host": "127.0.0.1", "port": Raw("{relay_port}"), "retry_first_seconds": 0.2,
           "operator": "ops@idomoo.example"},
    processing={"workers": 2, "max_attempts": 2, "retry_seconds": 0.1}) + """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data-team@acme.example"]
zip_password = {{ env = "PG_TEST_ACME_ZIP" }}

[clients.acme.projects.spring]
keep_all_columns = true

# Mails data files but has no ZIP password on file: an operator's mistake that no
# retry can mend.
[clients.nopw]
name = "No password"
regions = ["usa"]
senders = ["files@nopw.example"]

[clients.nopw.projects.spring]
keep_all_columns = true
"""


def mail(sender: str = SENDER) -> bytes:
    return client_mail([(f"{NAME}.zip", aes_zip({f"{NAME}.csv": rows()}), "application/zip")],
                       sender=sender)


@pytest_asyncio.fixture
async def gateway_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> AsyncIterator[tuple[Sink, Path, Path]]:
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    data_dir = tmp_path / "state"
    config_path = tmp_path / "regions.toml"
    config_path.write_text(CONFIG.format(data_dir=data_dir, relay_port=sink.port))
    yield sink, data_dir, config_path
    await sink.stop()


async def run_gateway(config_path: Path, data_dir: Path) -> tuple[object, asyncio.Event,
                                                                 asyncio.Task[None]]:
    gateway = build_gateway(parse_config(config_path.read_text()), "usa", data_dir=data_dir)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop, lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 10)
    return gateway, stop, task


@pytest.mark.asyncio
async def test_a_message_no_retry_can_mend_is_dead_lettered_and_answered_once(
        gateway_env: tuple[Sink, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sink, data_dir, config_path = gateway_env
    gateway, stop, task = await run_gateway(config_path, data_dir)
    port = gateway.smtp_port  # type: ignore[attr-defined]
    try:
        for _ in range(2):
            await aiosmtplib.send(mail(NOPW), sender=NOPW, recipients=[INBOUND],
                                  hostname="127.0.0.1", port=port)
        await aiosmtplib.send(mail(), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=port)
        await sink.wait_to(SENDER)  # the queue moved on: acme's file got its reply
        await drained(gateway)
    finally:
        stop.set()
        await task

    # Each poison message: one answer to its sender, saying what happens next.
    answers = sink.to(NOPW)
    assert len(answers) == 2
    dead = sorted((data_dir / "spool" / "dead").glob("*.msg"))
    assert len(dead) == 2
    for answer in answers:
        body = answer.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "fault on our side" in body
        assert "Our operators have been alerted" in body
        assert "need not send it again" in body
        assert any(path.stem in body for path in dead)
        assert answer.message["In-Reply-To"]
    # One alert for the kind of trouble, not one per message; no row data in it.
    alerts = sink.to(OPS)
    assert len(alerts) == 1
    text = alerts[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Client: nopw" in text and "Channel: smtp" in text and "Error: ConfigError" in text
    # The first of the two to fail is named (two workers: either may be first).
    assert any(path.stem in text for path in dead)
    assert "Zoë" not in text and "acme.example" not in text
    assert "processed" in sink.to(SENDER)[0].message.get_body(  # type: ignore[union-attr]
        ("plain",)).get_content()
    reason = json.loads(dead[0].with_suffix(".json").read_text())
    assert reason["error"] == "ConfigError" and reason["attempts"] == 1  # no retry: config
    assert not list((data_dir / "spool" / "incoming").glob("*.msg"))

    # The operator sees them and puts one back once the cause is fixed.
    capsys.readouterr()
    assert main(["dead-letters", "--config", str(config_path), "--region", "usa"]) == 0
    listing = capsys.readouterr().out
    assert dead[0].stem in listing and dead[1].stem in listing and "ConfigError" in listing
    assert "2 message(s) or upload(s) not processed" in listing
    assert main(["dead-letters", "--config", str(config_path), "--region", "usa",
                 "--requeue", dead[0].stem]) == 0
    assert (data_dir / "spool" / "incoming" / dead[0].name).exists()
    assert not dead[0].exists()


@pytest.mark.asyncio
async def test_damaged_spool_files_are_dead_lettered_with_an_alert(
        gateway_env: tuple[Sink, Path, Path]) -> None:
    """Spool files whose envelope line is damaged (a disk fault, a hand edit) are not
    passed over forever: each is dead-lettered with an operator alert; one whose message
    is intact answers its registered sender (read from the From header, which intake
    checked); garbage answers nobody. The queue moves on."""
    sink, data_dir, config_path = gateway_env
    incoming = data_dir / "spool" / "incoming"
    incoming.mkdir(parents=True)
    garbage = incoming / "00000000000000000001-damaged00001.msg"
    garbage.write_bytes(b"\x00\x00garbage without an envelope line")
    intact = incoming / "00000000000000000002-damaged00002.msg"
    intact.write_bytes(b"PURLGATE-ENVELOPE {\"chann\n" + mail(NOPW))
    gateway, stop, task = await run_gateway(config_path, data_dir)
    try:
        await sink.wait_to(OPS, 2)
        await sink.wait_to(NOPW)
        await aiosmtplib.send(mail(), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=gateway.smtp_port)  # type: ignore[attr-defined]
        await sink.wait_to(SENDER)
        await drained(gateway)
    finally:
        stop.set()
        await task
    alerts = [m.raw.decode() for m in sink.to(OPS)]
    assert len(alerts) == 2 and all("DamagedEntryError" in a for a in alerts)
    assert any("Client: nopw" in a for a in alerts) and any("Client: -" in a for a in alerts)
    (answer,) = sink.to(NOPW)
    body = answer.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "fault on our side" in body and intact.stem in body
    assert sorted({m.rcpt_tos[0] for m in sink.messages}) == sorted({OPS, NOPW, SENDER})
    for path in (garbage, intact):
        assert (data_dir / "spool" / "dead" / path.name).exists() and not path.exists()


# -- the scheduler on its own ------------------------------------------------------------


class Entry:
    def __init__(self, ident: str, client: str, fails: int = 0,
                 error: type[Exception] = RuntimeError) -> None:
        self.id, self.client, self.fails, self.error = ident, client, fails, error


async def run_queue(entries: list[Entry], *, workers: int = 1, max_attempts: int = 3
                    ) -> tuple[list[str], list[tuple[str, str, int]]]:
    handled: list[str] = []
    dead: list[tuple[str, str, int]] = []
    stop = asyncio.Event()

    def handle(entry: Entry) -> None:
        handled.append(entry.id)
        if entry.fails > 0:
            entry.fails -= 1
            raise entry.error("boom")

    def on_dead(entry: Entry, exc: BaseException, attempts: int) -> None:
        dead.append((entry.id, type(exc).__name__, attempts))

    worker: QueueWorker[Entry] = QueueWorker(
        "test", handle=handle, pending=lambda: entries, ident=lambda e: e.id,
        fair_key=lambda e: e.client, workers=workers, max_attempts=max_attempts,
        retry_seconds=0.05, on_dead=on_dead)
    task = asyncio.create_task(worker.run(stop))
    # Idle once it has taken the entries in: each one ended (handled or dead-lettered).
    await eventually(lambda: handled and worker.idle, "every entry handled or dead-lettered",
                     timeout=10, every=0.01)
    stop.set()
    await task
    return handled, dead


@pytest.mark.asyncio
async def test_clients_are_served_in_turn() -> None:
    """Five files from a busy client do not hold up the one file of another."""
    entries = [Entry(f"a{i}", "a") for i in range(5)] + [Entry("b0", "b"), Entry("c0", "c")]
    handled, dead = await run_queue(entries)
    assert handled == ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]
    assert dead == []


@pytest.mark.asyncio
async def test_a_transient_failure_is_retried_while_running() -> None:
    entries = [Entry("a0", "a", fails=1), Entry("b0", "b")]
    handled, dead = await run_queue(entries)
    assert handled == ["a0", "b0", "a0"]  # b was not held up by a's back-off
    assert dead == []


@pytest.mark.asyncio
async def test_repeated_failures_end_in_the_dead_letter() -> None:
    handled, dead = await run_queue([Entry("a0", "a", fails=9), Entry("b0", "b",
                                                                     error=ConfigError,
                                                                     fails=1)])
    assert handled.count("a0") == 3 and handled.count("b0") == 1
    assert sorted(dead) == [("a0", "RuntimeError", 3), ("b0", "ConfigError", 1)]


@pytest.mark.asyncio
async def test_a_storage_fault_pauses_and_never_gives_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "STORAGE_PAUSE_FIRST", 0.02)
    entries = [Entry("a0", "a", fails=5, error=StorageError), Entry("b0", "b")]
    handled, dead = await run_queue(entries, max_attempts=2)
    # Paused, not failed: a0 came back first each time, b0 waited, nothing dead.
    assert handled == ["a0"] * 6 + ["b0"]
    assert dead == []


@pytest.mark.asyncio
async def test_an_os_level_full_disk_counts_as_a_storage_fault(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "STORAGE_PAUSE_FIRST", 0.02)

    class DiskFullError(OSError):
        def __init__(self, text: str) -> None:
            super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handled, dead = await run_queue([Entry("a0", "a", fails=3, error=DiskFullError)],
                                    max_attempts=1)
    assert handled == ["a0"] * 4
    assert dead == []
