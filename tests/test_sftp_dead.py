"""SFTP uploads that cannot be processed: dead-lettered with an operator alert, the
client's answer (an error file) in Downloads when we know whose it is, and the queue
moves on. A real asyncssh server, driven by asyncssh."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import asyncssh
import pytest

from purlgate.channels import queue_worker
from purlgate.channels.defender import Defender
from purlgate.channels.sftp import SftpService, SftpSpool, SftpWorker
from purlgate.config import DefenderConfig, SftpConfig, parse_config
from purlgate.errors import StorageError
from purlgate.region import build_region
from tests.conftest import TEST_CONFIG
from tests.disk_helpers import fill, tmpfs
from tests.sftp_helpers import CSV, Keys, T, start
from tests.waiting import eventually

OPS = "ops@idomoo.example"


def plant(data_dir: Path, entry_id: str, meta: str | None, name: str = "x.csv") -> Path:
    """A spool entry as a previous run left it (``meta`` None: no readable meta.json)."""
    folder = data_dir / "sftp-spool" / "incoming" / entry_id
    folder.mkdir(parents=True)
    (folder / name).write_bytes(CSV)
    (folder / "meta.json").write_text(meta if meta is not None else "{not json")
    return folder


@pytest.mark.asyncio
async def test_uploads_that_cannot_be_processed_are_dead_lettered(tmp_path: Path,
                                                                 keys: Keys) -> None:
    data_dir = tmp_path / "state"
    plant(data_dir, "00000000000000000001-damaged00001", None)
    # Accepted for a project that a later configuration no longer has: no retry mends it.
    gone = f"gone_{T}.csv"
    plant(data_dir, "00000000000000000002-goneproject1",
          json.dumps({"client": "acme", "project": "gone", "name": gone}), gone)
    r = await start(tmp_path, keys, data_dir=data_dir)
    try:
        dead = data_dir / "sftp-spool" / "dead"
        await eventually(lambda: len(list(dead.iterdir())) == 2, "both dead-lettered")
        assert sorted(p.name for p in dead.iterdir()) == [
            "00000000000000000001-damaged00001", "00000000000000000002-goneproject1"]
        # The queue moves on: a good upload is processed as usual.
        async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
                sftp.open(f"/spring/Uploads/after_{T}.csv", "wb") as f:
            await f.write(CSV)
        await r.wait_for(r.downloads() / f"PURL_after_{T}.csv")
        alerts = await r.sink.wait_to(OPS, 2)
    finally:
        await r.shutdown()
    damaged = json.loads((dead / "00000000000000000001-damaged00001" / "reason.json")
                         .read_text())
    assert damaged["error"] == "DamagedEntryError" and damaged["attempts"] == 1
    lost = json.loads((dead / "00000000000000000002-goneproject1" / "reason.json").read_text())
    assert lost["error"] == "KeyError" and lost["attempts"] == 3 and lost["alerted"]
    texts = sorted(a.raw.decode() for a in alerts)
    assert any("DamagedEntryError" in t for t in texts)
    assert any("KeyError" in t and "Client: acme" in t and "Channel: sftp" in t for t in texts)
    assert not any("Zo" in t for t in texts)  # no row data
    assert not list((data_dir / "sftp-spool" / "incoming").iterdir())


@pytest.mark.asyncio
async def test_a_full_disk_refuses_the_upload_cleanly_and_recovers(
        tmp_path: Path, keys: Keys) -> None:
    """On a full disk the client's write fails with an SFTP failure that says why;
    nothing of the upload stays, the name is free, the server goes on, and the same
    upload succeeds once space is back. A real 4 MiB tmpfs (root only)."""
    with tmpfs(tmp_path / "disk", "4m") as mount:
        r = await start(tmp_path, keys, data_dir=mount / "state")
        try:
            filler = fill(mount)
            name = f"/spring/Uploads/full_{T}.csv"
            big = CSV + b"".join(b"Name%d,n%d@acme.example\n" % (i, i) for i in range(40_000))
            async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
                with pytest.raises(asyncssh.SFTPError) as refused:
                    async with sftp.open(name, "wb") as f:
                        await f.write(big)
                assert "out of disk space" in str(refused.value.reason)
                assert "upload the file again later" in str(refused.value.reason)
            assert list(r.uploads().iterdir()) == []
            assert not list((mount / "state" / "sftp-spool" / "incoming").iterdir())
            filler.unlink()
            async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
                    sftp.open(name, "wb") as f:
                await f.write(CSV)
            await r.wait_for(r.downloads() / f"PURL_full_{T}.csv")
        finally:
            await r.shutdown()


@pytest.mark.asyncio
async def test_a_disk_error_reading_an_upload_is_retried_not_dead_lettered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient read error (EIO) on an upload's meta.json is a storage fault, as in
    the mail spool: the upload waits and is processed once the disk reads again; it is
    not dead-lettered as damaged."""
    monkeypatch.setattr(queue_worker, "RESCAN_SECONDS", 0.2)
    region = build_region(parse_config(TEST_CONFIG), "usa", data_dir=tmp_path / "state")
    name = f"acme_spring_{T}_00.csv"
    entry = "00000000000000000003-eioentry0001"
    plant(tmp_path / "state", entry,
          json.dumps({"client": "acme", "project": "spring", "name": name}), name)
    failing = {"left": 3}
    real = Path.read_text

    def flaky(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "meta.json" and failing["left"] > 0:
            failing["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    spool = SftpSpool(tmp_path / "state" / "sftp-spool")
    service = SftpService(config=SftpConfig(), root=tmp_path / "state" / "sftp",
                          clients=region.processor.clients, store=region.store, spool=spool,
                          defender=Defender(DefenderConfig()))
    monkeypatch.setattr(Path, "read_text", flaky)
    with pytest.raises(StorageError):
        spool.pending()
    service.downloads("acme", "spring").mkdir(parents=True)
    worker = SftpWorker(service, region.processor)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        result = service.downloads("acme", "spring") / f"PURL_{name}"
        await eventually(result.exists, "processed once the disk reads again")
    finally:
        stop.set()
        await running
        region.close()
    assert failing["left"] == 0
    assert list((tmp_path / "state" / "sftp-spool" / "dead").iterdir()) == []
