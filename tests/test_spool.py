"""The spool: durable before the answer, nothing half-written, group-committed syncs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from purlgate.channels import spool as spool_module
from purlgate.channels.spool import Spool
from purlgate.core import files as files_module
from purlgate.core.files import GroupSync
from purlgate.errors import SpoolFullError


def test_accept_then_pending_round_trips_bytes(tmp_path: Path) -> None:
    """The raw message comes back byte for byte with its envelope, after a 'restart'."""
    raw = b"From: a@x\r\n\r\n\xff\x00 binary-ish body\r\n.\r\n"
    entry = Spool(tmp_path).accept(raw, {"channel": "smtp", "mail_from": "a@x"})
    again = Spool(tmp_path).pending()
    assert [e.id for e in again] == [entry.id]
    assert again[0].raw == raw
    assert again[0].meta["mail_from"] == "a@x" and again[0].meta["size"] == len(raw)


def test_a_big_message_written_in_pieces_commits_byte_for_byte(tmp_path: Path) -> None:
    """Past WRITEBACK_BYTES the pieces start going to disk as they arrive; the committed
    entry is still the message exactly, with its size."""
    pieces = [bytes([i]) * (256 * 1024 + i) for i in range(40)]  # about 10 MB
    spool = Spool(tmp_path)
    writer = spool.begin({"channel": "smtp", "mail_from": "a@x"})
    for piece in pieces:
        writer.write(piece)
    entry = writer.commit()
    assert sum(map(len, pieces)) > 2 * spool_module.WRITEBACK_BYTES
    [again] = Spool(tmp_path).pending()
    assert again.id == entry.id and again.raw == b"".join(pieces)
    assert entry.meta["size"] == sum(map(len, pieces))


def test_unacknowledged_leftovers_are_dropped(tmp_path: Path) -> None:
    """A file still in tmp/ at start was never acknowledged: removed, not processed."""
    Spool(tmp_path)
    (tmp_path / "tmp" / "half.msg").write_bytes(b"PURLGATE-ENVELOPE {}\npartial")
    assert Spool(tmp_path).pending() == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_full_disk_refuses_without_a_file(tmp_path: Path) -> None:
    """Below the floor: SpoolFullError and no file anywhere."""
    with pytest.raises(SpoolFullError):
        Spool(tmp_path, min_free_bytes=1 << 62).accept(b"x", {})
    assert list((tmp_path / "incoming").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_group_sync_covers_every_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 concurrent callers: each returns only after a sync that began after its call,
    and far fewer syncs than callers run."""
    syncs: list[int] = []
    lock = threading.Lock()
    calls = {"n": 0}
    started_after: list[bool] = []

    def slow_fsync(folder: Path) -> None:
        with lock:
            syncs.append(calls["n"])
        threading.Event().wait(0.02)

    monkeypatch.setattr(files_module, "fsync_dir", slow_fsync)
    group = GroupSync(tmp_path)

    def caller() -> None:
        with lock:
            calls["n"] += 1
            mine = calls["n"]
        group.sync()
        with lock:
            started_after.append(any(seen >= mine for seen in syncs))

    threads = [threading.Thread(target=caller) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert started_after == [True] * 40
    assert len(syncs) < 20
