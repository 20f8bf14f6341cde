"""Several instances of one region: two real `purlgate serve` processes on one PostgreSQL
and one shared data folder. Lose one by kill -9 and lose nothing: every accepted message
and upload is answered once, by whichever instance is left."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest

from tests.instance_helpers import (
    INBOUND,
    SENDER,
    Instance,
    answers,
    batches,
    config,
    links_of,
    replies_by_parent,
    upload,
)
from tests.mail_helpers import Sink, good_mail, queues_empty
from tests.sftp_helpers import CSV, Keys
from tests.waiting import eventually

MAILS, TWICE, UPLOADS = 300, 50, 20


def _name(n: int) -> str:
    return f"acme_spring_20261127_{101500 + n // 100:06d}_{n % 100:02d}"


async def _send(port: int, raw: bytes) -> None:
    await aiosmtplib.send(raw, sender=SENDER, recipients=[INBOUND], hostname="127.0.0.1",
                          port=port, timeout=60)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_two_instances_lose_one_and_nothing_else(tmp_path: Path, pg_url: str,
                                                       keys: Keys) -> None:
    """300 mails over both SMTP ports (50 of them delivered to both, as an MX retry
    does) and 20 SFTP uploads through both; one instance is killed mid-work and not
    restarted. The other finishes: one answer and one PURL file per message and
    upload, no name claimed twice, every link served by both web ports (the dead one's
    checked before it died), and `purlgate batches` shows them all, with who ran them."""
    sink = await Sink().start()
    cfg = tmp_path / "regions.toml"
    cfg.write_text(config(sink.port, keys.acme_pub))
    data = tmp_path / "shared"
    a, b = await asyncio.gather(Instance.start("box-a", cfg, data, pg_url),
                                Instance.start("box-b", cfg, data, pg_url))
    try:
        distinct = MAILS - TWICE
        mails = [good_mail(_name(n)) for n in range(distinct)]
        sends = [_send((a, b)[n % 2].smtp, raw) for n, raw in enumerate(mails)]
        sends += [_send((b, a)[n % 2].smtp, raw) for n, raw in enumerate(mails[:TWICE])]
        sends += [upload((a, b)[n % 2].sftp, keys.acme, f"{_name(500 + n)}.csv", CSV)
                  for n in range(UPLOADS)]
        for start in range(0, len(sends), 16):
            await asyncio.gather(*sends[start:start + 16])
        # Both are at work; a's links answer on both ports while it lives.
        await sink.wait_to(SENDER, 20, timeout=120)
        early = links_of(sink.to(SENDER)[0])[0]
        assert {await answers(a.web, early), await answers(b.web, early)} == {200}
        a.kill()
        replies = await eventually(
            lambda: (found := replies_by_parent(sink)) and len(found) >= distinct and found,
            "every message answered", timeout=300)
        downloads = data / "sftp" / "acme" / "spring" / "Downloads"
        await eventually(lambda: len(list(downloads.glob("PURL_*"))) >= UPLOADS,
                         "every upload answered", timeout=120)
        await queues_empty(data, timeout=120)
        assert not list((data / "sftp-spool" / "incoming").iterdir())
    finally:
        a.kill()
        log = await b.stop()
        await sink.stop()
    assert len(replies) == distinct, "one reply per distinct message"
    assert all(len(ids) == 1 for ids in replies.values()), "never two different replies"
    assert len(list(downloads.glob("PURL_*"))) == UPLOADS
    view = batches(cfg, data, pg_url)
    done = [v for v in view["batches"] if v["status"] == "Done"]
    assert len(done) == distinct + UPLOADS, "one batch per message and upload"
    assert len({v["file"] for v in done}) == len(done), "no name claimed twice"
    assert {v["instance"] for v in done} == {"box-a", "box-b"}
    assert {i["name"] for i in view["instances"]} == {"box-a", "box-b"}
    late = links_of(sink.to(SENDER)[-1])[-1]
    restart = await Instance.start("box-c", cfg, data, pg_url)  # any instance serves any link
    try:
        assert await answers(restart.web, late) == 200
        assert await answers(restart.web, early) == 200
    finally:
        await restart.stop()
    assert "Traceback" not in log, log
