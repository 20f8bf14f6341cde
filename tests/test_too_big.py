"""Replies too big for mail: a relay that announces a small SIZE is never handed a reply
past it; the client gets a short reply with a link for that ZIP only, which downloads
the ZIP their password opens, until it expires; then, like a forged link, the uniform
404. The batch view shows the link."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest

from purlgate.channels.outbox import Outbox
from purlgate.channels.relay_data import Outgoing
from purlgate.core import archive
from purlgate.errors import PermanentDeliveryError
from purlgate.web.server import NOT_FOUND
from tests.config_builder import region_toml
from tests.mail_helpers import (
    INBOUND,
    MAIL_CLIENTS,
    PASSWORD,
    RELAY,
    SENDER,
    Clock,
    Sink,
    T,
    aes_zip,
    client_mail,
    drained,
    start,
)
from tests.waiting import eventually

NAME = f"acme_spring_{T}_00"
LIMIT = 60_000


def random_rows(n: int) -> bytes:
    """Rows that do not compress: the reply's ZIP grows with them."""
    lines = ["first_name,code,email"] + [f"Zoë{i},{secrets.token_hex(24)},u{i}@acme.example"
                                         for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.asyncio
async def test_a_reply_past_the_relays_size_becomes_a_download_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink(size=LIMIT).start()
    text = region_toml(smtp={"port": 0}, web={"port": 0},
                       relay={"host": "127.0.0.1", "port": sink.port,
                              "retry_first_seconds": 0.2, "operator": "ops@idomoo.example"}
                       ) + MAIL_CLIENTS
    run = await start(tmp_path, sink, text=text)
    data = random_rows(3000)
    try:
        # serve asked the relay its SIZE at start, and kept it for the worker processes
        await eventually((run.data_dir / "outbox" / "relay.json").exists,
                         "the relay's SIZE learned", timeout=10)
        await run.send(client_mail([(f"{NAME}.zip", aes_zip({f"{NAME}.csv": data}),
                                     "application/zip")]))
        [reply] = await sink.wait_to(SENDER, timeout=60)
        await drained(run.gateway)
        base = f"http://127.0.0.1:{run.gateway.web_port}"
        body = reply.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        found = re.search(r"It is too big for mail \(([\d.]+) MB; the mail relay takes at most "
                          r"0\.1 MB\), so it is not attached: download it from "
                          r"https://purl\.test/d/([0-9a-f]{32}) \(a link for this file only, "
                          r"until (\d{4}-\d\d-\d\d \d\d:\d\d) UTC\)\.", " ".join(body.split()))
        assert found is not None, body
        assert list(reply.message.iter_attachments()) == []
        token = found.group(2)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/d/{token}") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Disposition"] == f'attachment; filename="PURL_{NAME}.zip"'
                assert resp.headers["Cache-Control"] == "private, no-store"
                zipped = await resp.read()
            async with http.get(f"{base}/ops/api/batches") as resp:
                [batch] = (await resp.json())["batches"]
            for forged in ("0" * 32, token[:-1] + ("0" if token[-1] != "0" else "1"), "x.zip"):
                async with http.get(f"{base}/d/{forged}") as resp:
                    assert (resp.status, await resp.text()) == (404, NOT_FOUND)
            links = run.gateway.links
            assert links is not None and links.downloads is not None
            links.downloads.clock = lambda: time.time() + 72 * 3600 + 1  # past its time
            async with http.get(f"{base}/d/{token}") as resp:
                assert (resp.status, await resp.text()) == (404, NOT_FOUND)
            assert links.downloads.sweep() == 1
            assert list(links.downloads.root.iterdir()) == []
    finally:
        await run.shutdown()
        await sink.stop()
    files = archive.read_zip(zipped, PASSWORD).members
    purl = files[f"PURL_{NAME}.csv"].decode().splitlines()
    assert len(purl) == 3001 and purl[0].endswith(",thumbnail_1,landingPage")
    assert f"SHA-256 of the PURL file we made: {hashlib.sha256(files[f'PURL_{NAME}.csv']).hexdigest()}" \
        in body
    assert batch["download"]["url"] == f"https://purl.test/d/{token}"
    assert all(len(m.raw) < LIMIT for m in sink.messages), "nothing past the SIZE was sent"
    assert sink.tried == len(sink.messages), "and nothing was refused"


@pytest.mark.asyncio
async def test_the_outbox_never_hands_the_relay_a_message_past_its_size(
        tmp_path: Path) -> None:
    """A message larger than the relay takes (a limit learned or configured) is failed
    without an attempt, with an operator alert's reason; a smaller one goes."""
    sent: list[bytes] = []

    async def relay(message: Outgoing, sender: str, recipients: object) -> None:
        data = message.read()
        if len(data) > 5000:
            raise PermanentDeliveryError("552 would have been said")
        sent.append(data)

    failed: list[tuple[str, str]] = []
    outbox = Outbox(tmp_path / "outbox", RELAY, sender=relay, clock=Clock(),
                    on_failed=lambda item, why, folder: failed.append(
                        (why, item.meta["last_error"])))
    outbox.limit = lambda: 5000
    for size in (100, 20_000):
        message = EmailMessage()
        message["Subject"] = f"{size} bytes"
        message.set_content("x" * size)
        outbox.enqueue(message, sender=INBOUND, recipients=[SENDER])
    await outbox.deliver_due()
    assert len(sent) == 1 and len(failed) == 1
    why, error = failed[0]
    assert why == "refused" and error.startswith("larger than the relay takes (")
    assert error.endswith("bytes; its limit is 5000): not handed to it")
