"""Memory goes back after big work: a mail worker process that grew on a big file is
replaced once none is busy, so a real `purlgate serve` returns to its idle footprint
(PSS summed over its whole process tree, as the machine counts it)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiosmtplib
import pytest

from tests.dovecot import free_port
from tests.mail_helpers import (
    INBOUND,
    SENDER,
    Sink,
    T,
    aes_zip,
    client_mail,
    good_mail,
    mail_config,
    queues_empty,
)
from tests.proc_helpers import tree_pss_mb
from tests.serve_helpers import start


def big_mail(megabytes: int) -> bytes:
    """A data file of about ``megabytes`` MB of CSV (values that hardly compress)."""
    rows = megabytes * 1024 * 1024 // 60
    body = "first_name,email,code\n" + "".join(
        f"N{j},u{j}@acme.example,{os.urandom(16).hex()}\n" for j in range(rows))
    name = f"acme_spring_{T}_07"
    return client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": body.encode()}),
                         "application/zip")])


async def _ready_workers(stderr: object, lines: list[str], count: int) -> list[int]:
    ready: list[int] = []
    while len(ready) < count:
        line = await asyncio.to_thread(stderr.readline)  # type: ignore[attr-defined]
        assert line, "serve ended: " + "".join(lines)
        lines.append(line)
        if "mail worker process" in line and line.rstrip().endswith("ready"):
            ready.append(int(line.split("mail worker process ")[1].split()[0]))
    return ready


@pytest.mark.asyncio
async def test_workers_that_grew_on_a_big_file_are_replaced_and_memory_returns(
        tmp_path: Path) -> None:
    """A 20 MB data file leaves its worker process holding more than
    processing.recycle_mb (here 8 MB; what its heap keeps, and what it built at first
    use); once the reply is out and no entry is in hand, both workers are replaced by
    fresh ones forked from the forkserver, and serve's whole tree is back within 10 MB
    of its idle PSS before any work; the next message is answered by the new workers.
    (The default, 20 MB, is met after a burst of big files: bench/intake.py --replies.)"""
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(mail_config(sink.port, max_bytes=40_000_000)
                   + "\n[regions.usa.processing]\nrecycle_mb = 8\n")
    data, smtp = tmp_path / "state", free_port()
    proc = start(cfg, data, smtp, logs=True)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        first = await _ready_workers(proc.stderr, lines, 2)
        await asyncio.sleep(1.0)  # settled
        idle = tree_pss_mb(proc.pid)
        await aiosmtplib.send(big_mail(20), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=smtp, timeout=60)
        await sink.wait_to(SENDER, timeout=120)
        await queues_empty(data)
        second = await asyncio.wait_for(_ready_workers(proc.stderr, lines, 2), 30)
        await asyncio.sleep(1.0)
        after = tree_pss_mb(proc.pid)
        await aiosmtplib.send(good_mail(f"acme_spring_{T}_08"), sender=SENDER,
                              recipients=[INBOUND], hostname="127.0.0.1", port=smtp,
                              timeout=30)
        reply = (await sink.wait_to(SENDER, 2, timeout=60))[1]
    finally:
        proc.terminate()
        rest = await asyncio.to_thread(proc.communicate, None, 30)
        await sink.stop()
    log = "".join(lines) + rest[1]
    assert "mail worker processes replaced" in log, log
    assert not set(first) & set(second), "new processes"
    assert not any(Path(f"/proc/{pid}").exists() for pid in first), "the old ones ended"
    assert after <= idle + 10, f"idle {idle} MB, after the big file {after} MB"
    assert "processed" in str(reply.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
