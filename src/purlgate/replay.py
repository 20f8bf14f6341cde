"""QA replay: send fixture emails to a running instance and check what comes back.

    purlgate replay fixtures/emails/*.eml --smtp 127.0.0.1:2525 --capture 127.0.0.1:2526

Each fixture is sent in manifest order and, with ``--capture``, its reply is awaited on
an SMTP sink that the instance's relay points at (matched by In-Reply-To), then checked
against ``manifest.toml``: the status, the AES ZIP opening with the agreed password, the
PURL file's row count and columns; failures by the text of the reply; refusals by the
SMTP code.

Every run is fresh: the date and time in each data file's name (inside the ZIPs, which
are re-made with the same password and encryption) become the run's start time plus an
index per distinct stamp (names that differ still differ, and the duplicate-name
fixture still repeats the first one's), a run never starts within the second of the
previous one, and each message gets a new Message-ID. A replay can so be run again at once against
the same instance; a ZIP it cannot open (the wrong-password fixture) is sent as it is.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from purlgate.core.archive import aes_zip, read_zip
from purlgate.errors import ArchiveError


@dataclass
class Result:
    file: str
    expected: str
    got: str
    ok: bool


class Capture:
    """The relay's stand-in: keeps every message the instance sends out."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: SMTP, session: Session,  # noqa: N802
                          envelope: Envelope) -> str:
        parsed = BytesParser(policy=policy.default).parsebytes(envelope.original_content or b"")
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 2.0.0 OK"

    async def reply_to(self, message_id: str, timeout: float) -> EmailMessage | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for m in self.messages:
                if str(m.get("In-Reply-To", "")).strip() == message_id:
                    return m
            await asyncio.sleep(0.1)
        return None


def load_manifest(path: Path) -> tuple[dict[str, dict[str, Any]], bytes | None]:
    data = tomllib.loads(path.read_text("utf-8"))
    password = None
    if "password_file" in data:
        password = (path.parent / data["password_file"]).read_bytes().strip()
    return {e["file"]: e for e in data.get("email", [])}, password


STAMP = re.compile(rb"20\d{6}_\d{6}(?:_\d{2})?")


class Renamer:
    """One run's names: each distinct date-and-time in a fixture's names becomes this
    run's start time plus its own two-digit index; equal stamps stay equal."""

    def __init__(self, start: datetime) -> None:
        self.start = start.replace(microsecond=0)
        self._run = self.start.strftime("%Y%m%d_%H%M%S")
        self._index: dict[bytes, int] = {}

    def __call__(self, name: str) -> str:
        def move(match: re.Match[bytes]) -> bytes:
            index = self._index.setdefault(match.group(), len(self._index))
            return f"{self._run}_{index:02d}".encode()
        return STAMP.sub(move, name.encode()).decode()


def _rezip(data: bytes, rename: Renamer, password: bytes | None) -> bytes | None:
    """The ZIP with its members renamed for this run, encrypted as before; None
    when it cannot be re-made as it was (another password, ZipCrypto): sent unchanged."""
    try:
        found = read_zip(data, password)
    except ArchiveError:
        return None
    if found.encrypted and not found.aes:
        return None
    renamed = {rename(name): body for name, body in found.members.items()}
    return aes_zip(renamed, password if found.encrypted else None)


def freshen(raw: bytes, rename: Renamer, password: bytes | None) -> bytes:
    """This run's copy of a fixture: a new Message-ID, this run's names."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    sender = message["From"].addresses[0].domain if message["From"] else "replay.invalid"
    del message["Message-ID"]
    message["Message-ID"] = make_msgid(domain=sender or "replay.invalid")
    for part in message.iter_attachments():
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        if not filename or not isinstance(payload, bytes):
            continue
        fresh = _rezip(payload, rename, password) if filename.lower().endswith(".zip") else None
        new_name = rename(filename)
        if fresh is None and new_name == filename:
            continue
        maintype, subtype = part.get_content_type().split("/", 1)
        part.set_content(fresh if fresh is not None else payload, maintype=maintype,
                         subtype=subtype, filename=new_name,
                         disposition=part.get_content_disposition() or "attachment")
    return message.as_bytes(policy=policy.SMTP)


def _inflate(raw: bytes, size: int) -> bytes:
    """Pad a message past ``size`` bytes with a filler attachment (oversize checks)."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    message.add_attachment(b"\0" * size, maintype="application", subtype="octet-stream",
                           filename="filler.bin")
    return message.as_bytes(policy=policy.SMTP)


def _check_reply(reply: EmailMessage, want: dict[str, Any], password: bytes | None) -> str:
    """Empty string when the reply is what the manifest says; else what is wrong."""
    body_part = reply.get_body(("plain",))
    body = body_part.get_content() if body_part is not None else ""
    attachments = list(reply.iter_attachments())
    if want["expect"] == "failure":
        if attachments:
            return "a failure reply must have no attachment"
        return "" if want["reason"] in body else f"reply does not say {want['reason']!r}"
    if f"Status: {want['status']}" not in body:
        said = [line for line in body.splitlines()
                if line.startswith(("Status:", "Reason:", "What to fix:"))]
        return f"expected status {want['status']}; the reply says " + (
            "; ".join(said) or repr(body.strip().splitlines()[:1]))
    if len(attachments) != 1 or password is None:
        return "no single ZIP attachment (or no password to open it)"
    data = attachments[0].get_payload(decode=True)
    if not isinstance(data, bytes):
        return "the attachment is not a file"
    try:
        members = read_zip(data, password).members
    except ArchiveError as exc:
        return f"the ZIP does not open with the password ({exc.message})"
    purl = next((body for n, body in members.items() if n.startswith("PURL_")), b"")
    if not purl:
        return "no PURL file in the ZIP"
    text = purl.decode(want.get("encoding", "utf-8-sig"))
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=want.get("delimiter", ",")))
    if rows[0] != want["columns"]:
        return f"columns are {rows[0]}"
    if len(rows) - 1 != want["rows"]:
        return f"{len(rows) - 1} rows, expected {want['rows']}"
    return ""


async def replay(files: list[Path], *, smtp: tuple[str, int],
                 capture: tuple[str, int] | None, manifest: Path, region: str | None,
                 timeout: float = 60.0) -> list[Result]:
    expected, password = load_manifest(manifest)
    rename = Renamer(datetime.now(UTC))
    order = list(expected)
    files = sorted(files, key=lambda p: order.index(p.name) if p.name in order else 1_000)
    sink = Capture()
    server = None
    if capture is not None:
        server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(sink), capture[0], capture[1])
    results: list[Result] = []
    try:
        for path in files:
            want = expected.get(path.name)
            if want is None:
                results.append(Result(path.name, "?", "not in the manifest", ok=False))
                continue
            if region is not None and want.get("region") not in (None, region):
                continue
            results.append(await _one(path, want, password=password, smtp=smtp,
                                      sink=sink if server else None, timeout=timeout,
                                      rename=rename))
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        # The next run's names must differ from this one's: not within the same second.
        left = (rename.start + timedelta(seconds=1) - datetime.now(UTC)).total_seconds()
        if left > 0:
            await asyncio.sleep(left)
    return results


async def _one(path: Path, want: dict[str, Any], *, password: bytes | None,
               smtp: tuple[str, int], sink: Capture | None, timeout: float,
               rename: Renamer) -> Result:
    raw = freshen(path.read_bytes(), rename, password)
    message = BytesParser(policy=policy.default).parsebytes(raw)
    sender = message["From"].addresses[0].addr_spec
    recipient = message["To"].addresses[0].addr_spec
    if "inflate_to" in want:
        raw = _inflate(raw, int(want["inflate_to"]))
    expected = want["expect"] + (f" {want['code']}" if "code" in want else "")
    try:
        await aiosmtplib.send(raw, sender=sender, recipients=[recipient], hostname=smtp[0],
                              port=smtp[1], start_tls=False, timeout=timeout)
    except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
        return Result(path.name, expected, f"refused {exc.code}",
                      ok=want["expect"] == "refused" and exc.code == want.get("code"))
    except aiosmtplib.SMTPRecipientsRefused as exc:
        code = exc.recipients[0].code
        return Result(path.name, expected, f"refused {code}",
                      ok=want["expect"] == "refused" and code == want.get("code"))
    if want["expect"] == "refused":
        return Result(path.name, expected, "accepted (250)", ok=False)
    if sink is None:
        return Result(path.name, expected, "accepted (250); reply not checked", ok=True)
    reply = await sink.reply_to(str(message["Message-ID"]).strip(), timeout)
    if reply is None:
        return Result(path.name, expected, f"no reply within {timeout:g} s", ok=False)
    problem = _check_reply(reply, want, password)
    return Result(path.name, expected, problem or "as expected", ok=not problem)


def table(results: list[Result]) -> str:
    width = max([len(r.file) for r in results] + [4])
    lines = [f"{'file':<{width}}  {'expected':<12}  result  detail"]
    lines += [f"{r.file:<{width}}  {r.expected:<12}  {'PASS' if r.ok else 'FAIL':<6}  {r.got}"
              for r in results]
    passed = sum(r.ok for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)
