"""Load with faults: 500 emails over 20 SMTP sessions to a real `purlgate serve` that is
killed with SIGKILL three times at random moments and restarted, while its relay goes
away for 10 s. Each client session behaves like a sending MTA: a message without a 250
is sent again, byte for byte. Every message then has exactly one reply (a second copy
with the same Message-ID only where the relay took it just before a kill), and each
reply carries that message's own PURL file with its 20 rows."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import random
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.config_builder import Raw, region_toml
from tests.dovecot import free_port
from tests.mail_helpers import (
    INBOUND,
    SENDER,
    Sink,
    aes_zip,
    client_mail,
    queues_empty,
    reply_zip,
    rows,
)
from tests.serve_helpers import serve

MESSAGES, SESSIONS, KILLS, OUTAGE = 500, 20, 3, 10.0
CONFIG = region_toml(
    smtp={"port": 0, "max_connections_per_ip": 50},
    relay={"host": "127.0.0.1", "port": Raw("{relay_port}"), "retry_first_seconds": 0.2,
           "retry_max_seconds": 2, "operator": "ops@idomoo.example"}) + """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data-team@acme.example"]
zip_password = {{ env = "PG_TEST_ACME_ZIP" }}

[clients.acme.projects.spring]
keep_all_columns = true
"""


def mail(i: int) -> tuple[str, str, bytes]:
    """A message with its own file name (a time of day per message) and Message-ID."""
    stamp = f"20261127_{10 + i // 3600:02d}{(i // 60) % 60:02d}{i % 60:02d}"
    name = f"acme_spring_{stamp}_00"
    msgid = f"<load-{i}@acme.example>"
    raw = client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": rows()}), "application/zip")],
                      msgid=msgid)
    return msgid, name, raw


@pytest.mark.asyncio
async def test_every_accepted_message_gets_exactly_one_correct_reply(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    chance = random.Random(seed)
    relay_port = free_port()
    sink = await Sink().start(relay_port)  # goes away (its sessions cut) and comes back
    cfg = tmp_path / "regions.toml"
    cfg.write_text(CONFIG.format(relay_port=relay_port))
    data, smtp = tmp_path / "state", free_port()
    mails = [mail(i) for i in range(MESSAGES)]
    accepted: set[str] = set()
    resent: list[str] = []
    gateway = serve(cfg, data, smtp, crash_at=None)
    started = [gateway]  # every process, for the clean-up whatever happens
    kills = 0

    async def session(share: list[tuple[str, str, bytes]]) -> None:
        client: aiosmtplib.SMTP | None = None
        for msgid, _, raw in share:
            while True:  # as a sending MTA does: again until the 250
                try:
                    if client is None:
                        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp,
                                                 start_tls=False, timeout=30)
                        await client.connect()
                    await client.sendmail(SENDER, [INBOUND], raw)
                    accepted.add(msgid)
                    await asyncio.sleep(0.3)  # intake goes on while the kills come
                    break
                except (aiosmtplib.SMTPException, OSError):
                    client = None
                    resent.append(msgid)
                    await asyncio.sleep(0.2)
        if client is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()  # the gateway may have been killed meanwhile

    def serving() -> bool:
        return sink.server is not None and sink.server.is_serving()

    async def chaos() -> None:
        nonlocal gateway, kills
        await asyncio.sleep(2.0)
        await sink.stop()  # the relay is away for OUTAGE seconds, kills or not
        back = time.monotonic() + OUTAGE
        for _ in range(KILLS):
            await asyncio.sleep(chance.uniform(0.5, 3.0))
            gateway.kill()
            await asyncio.to_thread(gateway.wait, 30)
            assert gateway.stdout is not None
            gateway.stdout.close()
            kills += 1
            gateway = await asyncio.to_thread(serve, cfg, data, smtp, None)
            started.append(gateway)
            if not serving() and time.monotonic() >= back:
                await sink.start(relay_port)
        await asyncio.sleep(max(0.0, back - time.monotonic()))
        if not serving():
            await sink.start(relay_port)

    try:
        await asyncio.gather(chaos(), *(session(mails[k::SESSIONS]) for k in range(SESSIONS)))
        deadline = time.monotonic() + 180
        while len({m.message["In-Reply-To"] for m in sink.to(SENDER)}) < MESSAGES:
            assert time.monotonic() < deadline, (
                f"seed {seed}: {len(sink.to(SENDER))} replies of {MESSAGES}")
            await asyncio.sleep(0.2)
        await queues_empty(data)
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                await asyncio.to_thread(process.wait, 60)
            if process.stdout is not None:
                process.stdout.close()
        if serving():
            await sink.stop()

    assert kills == KILLS and len(accepted) == MESSAGES
    assert resent, "the kills came while mail was being sent"
    by_parent: dict[str, set[str]] = {}
    for reply in sink.to(SENDER):
        by_parent.setdefault(str(reply.message["In-Reply-To"]), set()).add(
            str(reply.message["Message-ID"]))
    assert set(by_parent) == {msgid for msgid, _, _ in mails}, f"seed {seed}"
    assert all(len(ids) == 1 for ids in by_parent.values()), f"seed {seed}: two answers"
    names = {msgid: name for msgid, name, _ in mails}
    checked: set[str] = set()
    for reply in sink.to(SENDER):
        parent = str(reply.message["In-Reply-To"])
        if parent in checked:
            continue  # a same-Message-ID copy
        checked.add(parent)
        files = reply_zip(reply)
        purl = files[f"PURL_{names[parent]}.csv"]
        table = list(csv.reader(io.StringIO(purl.decode("utf-8"))))
        assert len(table) == 21 and table[1][0] == "Zoë0", f"seed {seed}: {parent}"
    assert not list((data / "spool" / "dead").glob("*.msg"))
