"""kill -9 of a real `purlgate serve` at each boundary of an email's way through: after
a restart, exactly one reply (at the relay boundary, at most a second copy with the same
Message-ID), and nothing left in the spool or the outbox queue."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiosmtplib
import pytest

from tests.mail_helpers import INBOUND, SENDER, Sink, T, good_mail, queues_empty
from tests.serve_helpers import serve, setup, start

POINTS = ["spool-committed", "batch-running", "purl-published", "outbox-queued",
          "relay-accepted"]


@pytest.mark.asyncio
@pytest.mark.parametrize("point", POINTS)
async def test_one_reply_after_a_kill_at_each_boundary(tmp_path: Path, point: str) -> None:
    """The process dies by SIGKILL at the boundary; restarted, it answers the message
    once (the same Message-ID if the relay had already taken it), and no spool or
    outbox entry is left."""
    sink = await Sink().start()
    cfg, data, smtp = setup(tmp_path, sink)
    first = serve(cfg, data, smtp, crash_at=point)
    try:
        try:
            await aiosmtplib.send(good_mail(), sender=SENDER, recipients=[INBOUND],
                                  hostname="127.0.0.1", port=smtp, timeout=30)
        except aiosmtplib.SMTPException:
            assert point == "spool-committed", "only that kill comes before the 250"
        assert await asyncio.to_thread(first.wait, 60) == -9, "killed at the point"
    finally:
        if first.poll() is None:
            first.kill()
        assert first.stdout is not None
        first.stdout.close()
    second = serve(cfg, data, smtp, crash_at=None)
    try:
        await sink.wait_to(SENDER, timeout=60)
        await queues_empty(data)
    finally:
        second.terminate()
        await asyncio.to_thread(second.wait, 30)
        assert second.stdout is not None
        second.stdout.close()
        await sink.stop()
    replies = sink.to(SENDER)
    assert len({str(r.message["Message-ID"]) for r in replies}) == 1, "one reply"
    # Every message the relay took (reply and notifications): once each, except those
    # in flight if the relay had said 250 and the kill came before "sent" was recorded
    # (the outbox runs beside the batch and delivers several at once, so any kill may
    # land there): then a second copy with the same Message-ID, which mail systems drop.
    copies: dict[str, int] = {}
    for message in sink.messages:
        key = str(message.message["Message-ID"])
        copies[key] = copies.get(key, 0) + 1
    twice = [k for k, n in copies.items() if n == 2]
    assert max(copies.values()) <= 2, copies
    if point == "relay-accepted":
        assert twice, "the kill came between the relay's 250 and the record"
    notes = {str(m.message["Subject"]).split(":")[0] for m in sink.to("campaigns@acme.example")}
    assert notes == {"[purlgate] batch loaded", "[purlgate] batch done"}, \
        "notifications survive the kill too"
    assert list((data / "outbox" / "queue").iterdir()) == []


@pytest.mark.asyncio
async def test_worker_processes_ready_at_start_and_an_idle_one_that_dies_costs_no_message(
        tmp_path: Path) -> None:
    """`serve` prepares its mail worker processes at start (each logs that it is ready
    before any mail arrives), so the first message does not wait for them; a worker
    process killed while idle (after that message) is replaced when the next message
    comes, and that message is answered at its first try (never counted as a failed
    attempt)."""
    sink = await Sink().start()
    cfg, data, smtp = setup(tmp_path, sink)
    proc = start(cfg, data, smtp, logs=True)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        ready: list[int] = []
        while len(ready) < 2:  # processing.workers defaults to 2
            line = await asyncio.to_thread(proc.stderr.readline)
            assert line, "serve ended: " + "".join(lines)
            lines.append(line)
            if "mail worker process" in line and line.rstrip().endswith("ready"):
                ready.append(int(line.split("mail worker process ")[1].split()[0]))
        assert not any((data / "spool" / "incoming").glob("*.msg")), "no mail yet"
        await aiosmtplib.send(good_mail(), sender=SENDER, recipients=[INBOUND],
                              hostname="127.0.0.1", port=smtp, timeout=30)
        await sink.wait_to(SENDER, timeout=60)
        await queues_empty(data)  # both worker processes idle now
        os.kill(ready[0], 9)  # an idle worker process dies (OOM killer, an operator)
        # Once the pool has reaped it, it knows it is broken (a message racing the kill
        # by milliseconds would count one attempt and be retried: still one answer).
        deadline = asyncio.get_running_loop().time() + 30
        while Path(f"/proc/{ready[0]}").exists():
            assert asyncio.get_running_loop().time() < deadline, "never reaped"
            await asyncio.sleep(0.02)
        await aiosmtplib.send(good_mail(f"acme_spring_{T}_01"), sender=SENDER,
                              recipients=[INBOUND], hostname="127.0.0.1", port=smtp,
                              timeout=30)
        reply = (await sink.wait_to(SENDER, 2, timeout=60))[1]
        await queues_empty(data)
    finally:
        proc.terminate()
        rest = await asyncio.to_thread(proc.communicate, None, 30)
        await sink.stop()
    log = "".join(lines) + rest[1]
    assert "processed" in str(reply.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    assert "died while handling" not in log and " failed (" not in log, log
