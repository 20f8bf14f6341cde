"""A full disk degrades, never kills: the data on a small real tmpfs (mounted by the
test as root; skipped where mounting is refused)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

import purlgate.channels.outbox as outbox_module
import purlgate.channels.queue_worker as queue_module
from purlgate.channels.mail_process import MailProcesses
from purlgate.channels.outbox import Outbox
from purlgate.channels.relay_data import Outgoing
from purlgate.core.files import AtomicFile
from purlgate.errors import StorageError, TemporaryDeliveryError
from tests.config_builder import own
from tests.disk_helpers import fill, tmpfs
from tests.mail_helpers import (
    PASSWORD,
    RELAY,
    SENDER,
    Clock,
    Sink,
    aes_zip,
    client_mail,
    drained,
    note,
    rows,
    start,
)
from tests.waiting import eventually


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "512k") as mount:
        yield mount


def test_a_full_disk_fails_a_write_cleanly(small_disk: Path) -> None:
    """Writing a result on a full disk raises the storage error (not the flush's own
    error over it) and leaves no .part behind."""
    filler = fill(small_disk)
    with pytest.raises(StorageError), AtomicFile(small_disk / "PURL_x.csv") as out:
        out.file.write(b"x" * 200_000)
        out.commit()
    assert sorted(p.name for p in small_disk.iterdir()) == [filler.name]


@pytest.mark.asyncio
async def test_the_outbox_survives_a_full_disk_and_sends_once_space_is_back(
        small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relay down and disk full: the outbox cannot even record its attempt, and goes on
    running with the entry kept; once space is back and the relay answers, the message
    goes out, once."""
    monkeypatch.setattr(outbox_module, "STORAGE_RETRY_SECONDS", 0.1)
    sent: list[bytes] = []
    calls = 0
    relay_up = asyncio.Event()

    async def relay(message: Outgoing, sender: str, recipients: object) -> None:
        nonlocal calls
        calls += 1
        if not relay_up.is_set():
            raise TemporaryDeliveryError("relay down")
        sent.append(message.read())

    box = Outbox(small_disk / "outbox", RELAY, sender=relay, clock=Clock())
    box.enqueue(note(), sender="sftp-usa@idomoo.com", recipients=["a@acme.example"], key="r1")
    filler = fill(small_disk)
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stop))
    try:
        await eventually(lambda: calls >= 2, "tried (and failed to record the try) twice",
                         timeout=10)
        assert not task.done(), "still running on a full disk"
        assert [item.id for item in box.items()] == ["r1"], "the entry is kept"
        filler.unlink()
        relay_up.set()
        for _ in range(200):
            if sent:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert len(sent) == 1
    assert box.items() == []


# -- a whole gateway on a small disk ------------------------------------------------------


@pytest.fixture
def gateway_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 4 MiB tmpfs for a gateway's data directory; storage retries made quick."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    monkeypatch.setattr(outbox_module, "STORAGE_RETRY_SECONDS", 0.1)
    monkeypatch.setattr(queue_module, "STORAGE_PAUSE_FIRST", 0.1)
    monkeypatch.setattr(queue_module, "STORAGE_PAUSE_MAX", 0.2)
    with tmpfs(tmp_path / "gwdisk", "4m") as mount:
        yield mount


def mail_named(i: int) -> bytes:
    name = f"acme_spring_20261127_10150{i}_00"
    return client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": rows()}), "application/zip")])


@pytest.mark.asyncio
async def test_a_full_disk_answers_452_and_recovers_by_itself(
        tmp_path: Path, gateway_disk: Path) -> None:
    sink = await Sink().start()
    r = await start(tmp_path, sink, data_dir=gateway_disk / "state")
    try:
        filler = fill(gateway_disk)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await r.send(mail_named(1))
        assert refused.value.code == 452 and refused.value.message.startswith("4.3.1")
        assert not r.task.done(), "the listener is still up"
        assert r.spooled() == [] and not any(own(r.data_dir / "spool" / "tmp").iterdir())
        filler.unlink()  # space is back: no restart, no operator step
        await r.send(mail_named(2))
        await sink.wait_to(SENDER)
        await drained(r.gateway)
    finally:
        await r.shutdown()
        await sink.stop()
    assert len(sink.to(SENDER)) == 1
    assert "processed" in sink.to(SENDER)[0].message.get_body(  # type: ignore[union-attr]
        ("plain",)).get_content()


@pytest.mark.asyncio
async def test_a_disk_that_fills_mid_batch_pauses_the_batch_not_fails_it(
        tmp_path: Path, gateway_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Room for the message but not for its results: the batch waits for the disk (the
    client is not told to resend a file we hold) and finishes once space is back."""
    sink = await Sink().start()
    r = await start(tmp_path, sink, data_dir=gateway_disk / "state")
    try:
        processes = r.gateway.worker.processes
        assert isinstance(processes, MailProcesses)
        await processes.warmed()  # their own files made: the disk fills after them
        filler = fill(gateway_disk)
        os.truncate(filler, filler.stat().st_size - 12 * 1024)  # three pages free
        with caplog.at_level(logging.WARNING, logger="purlgate"):
            await r.send(mail_named(3))
            await eventually(lambda: "storage fault" in caplog.text, "a storage fault met")
            assert not r.task.done() and sink.to(SENDER) == []
            filler.unlink()
            await sink.wait_to(SENDER)
            await drained(r.gateway)
    finally:
        await r.shutdown()
        await sink.stop()
    replies = sink.to(SENDER)
    assert len(replies) == 1
    assert "processed" in replies[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert not any((r.data_dir / "spool" / "dead").iterdir())
    assert sink.to("ops@idomoo.example") == []  # nothing an operator must do


@pytest.mark.asyncio
async def test_replies_queued_with_the_relay_down_and_the_disk_full_all_go_out(
        tmp_path: Path, gateway_disk: Path) -> None:
    sink = await Sink().start()
    sink.answer = "451 4.3.0 relay down"
    r = await start(tmp_path, sink, data_dir=gateway_disk / "state")
    try:
        for i in range(3):
            await r.send(mail_named(4 + i))
        await eventually(lambda: not r.spooled() and len(r.gateway.outbox.items()) >= 3,
                    "three replies queued")
        filler = fill(gateway_disk)
        tried = sink.tried
        await eventually(lambda: sink.tried >= tried + 3, "the outbox tried on a full disk")
        assert not r.task.done(), "still up on a full disk with the relay down"
        sink.answer = "250 2.0.0 OK"
        filler.unlink()
        await sink.wait_to(SENDER, 3)
        await drained(r.gateway)
    finally:
        await r.shutdown()
        await sink.stop()
    replies = sink.to(SENDER)
    assert len(replies) == 3
    assert len({m.message["In-Reply-To"] for m in replies}) == 3
