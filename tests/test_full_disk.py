"""A full disk degrades, never kills: the data on a small real tmpfs (mounted by the
test as root; skipped where mounting is refused)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import purlgate.channels.outbox as outbox_module
from purlgate.channels.outbox import Outbox, TemporaryDeliveryError
from purlgate.core.files import AtomicFile
from purlgate.errors import StorageError
from tests.test_outbox import RELAY, Clock, note


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the file to delete to give the space back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


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

    async def relay(data: bytes, sender: str, recipients: object) -> None:
        nonlocal calls
        calls += 1
        if not relay_up.is_set():
            raise TemporaryDeliveryError("relay down")
        sent.append(data)

    box = Outbox(small_disk / "outbox", RELAY, sender=relay, clock=Clock())
    box.enqueue(note(), sender="sftp-usa@idomoo.com", recipients=["a@acme.example"], key="r1")
    filler = fill(small_disk)
    stop = asyncio.Event()
    task = asyncio.create_task(box.run(stop))
    try:
        for _ in range(200):  # until it has tried (and failed to record the try) twice
            if calls >= 2:
                break
            await asyncio.sleep(0.05)
        assert calls >= 2 and not task.done(), "still running on a full disk"
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
