"""Finding the one ZIP in what real mail clients send."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from purlgate.channels.mail_message import Attachment, header_addresses, zip_attachment
from purlgate.errors import MessageError
from tests.mail_helpers import aes_zip, client_mail, rows

ZIP = aes_zip({"a_20261127_101500.csv": rows(3)})


@dataclass
class Found:
    filename: str
    data: bytes
    attachment: Attachment


@pytest.fixture
def find(tmp_path: Path) -> Callable[[bytes], Found]:
    """The streaming reader on a message stored in a file, as the spool stores it."""

    def run(raw: bytes) -> Found:
        stored = tmp_path / "message.msg"
        stored.write_bytes(b"PURLGATE-ENVELOPE {}\n" + raw)
        _, found = zip_attachment(stored, tmp_path / "out.bin", offset=len(b"PURLGATE-ENVELOPE {}\n"))
        return Found(found.filename, found.path.read_bytes(), found)

    return run


@pytest.mark.parametrize("ctype", ["application/zip", "application/x-zip-compressed",
                                   "application/octet-stream"])
def test_zip_content_types(ctype: str, find: Callable[[bytes], Found]) -> None:
    """Gmail, Outlook and scripts label ZIPs differently; all are found, decoded byte
    for byte, with the sha256 of what was decoded."""
    found = find(client_mail([("data.zip", ZIP, ctype)]))
    assert (found.filename, found.data) == ("data.zip", ZIP)
    assert found.attachment.sha256 == hashlib.sha256(ZIP).hexdigest()


def test_octet_stream_without_zip_name_found_by_content(
        find: Callable[[bytes], Found]) -> None:
    """An unnamed-looking octet-stream that is a ZIP by its bytes is still the ZIP."""
    found = find(client_mail([("export.bin", ZIP, "application/octet-stream")]))
    assert found.data == ZIP


def test_inline_disposition(find: Callable[[bytes], Found]) -> None:
    """Some clients mark attachments inline."""
    assert find(client_mail([("d.zip", ZIP, "application/zip")],
                            disposition="inline")).data == ZIP


def test_rfc2231_encoded_file_name(find: Callable[[bytes], Found]) -> None:
    """filename*=utf-8''... (RFC 2231), as Thunderbird writes non-ASCII names."""
    outer = MIMEMultipart()
    outer["From"] = "a@acme.example"
    outer.attach(MIMEText("hi"))
    part = MIMEApplication(ZIP, "zip")
    part.add_header("Content-Disposition", "attachment",
                    filename=("utf-8", "", "données_20261127_101500.zip"))
    outer.attach(part)
    found = find(outer.as_bytes())
    assert (found.filename, found.data) == ("données_20261127_101500.zip", ZIP)


def test_rfc2047_encoded_file_name(find: Callable[[bytes], Found]) -> None:
    """name="=?UTF-8?B?...?=" (RFC 2047), as Outlook writes non-ASCII names."""
    raw = (b"From: a@acme.example\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain\r\n\r\nhi\r\n--XX\r\n"
           b"Content-Type: application/x-zip-compressed; name=\"=?UTF-8?B?"
           + base64.b64encode("Zoë.zip".encode()) +
           b"?=\"\r\nContent-Disposition: attachment; filename=\"=?UTF-8?B?"
           + base64.b64encode("Zoë.zip".encode()) +
           b"?=\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(ZIP) + b"--XX--\r\n")
    found = find(raw)
    assert (found.filename, found.data) == ("Zoë.zip", ZIP)


def test_body_parts_are_not_attachments(find: Callable[[bytes], Found]) -> None:
    """Text and HTML bodies are skipped; no ZIP is the client's error."""
    with pytest.raises(MessageError, match="no ZIP attachment"):
        find(client_mail([]))


def test_two_zips_are_the_client_s_error(find: Callable[[bytes], Found]) -> None:
    with pytest.raises(MessageError, match=r"2 ZIP attachments \(a.zip, b.zip\)"):
        find(client_mail([("a.zip", ZIP, "application/zip"), ("b.zip", ZIP, "application/zip")]))


def test_other_attachments_are_ignored(find: Callable[[bytes], Found]) -> None:
    """A signature image beside the ZIP is not counted."""
    found = find(client_mail([("logo.png", b"\x89PNG....", "image/png"),
                              ("d.zip", ZIP, "application/zip")]))
    assert (found.filename, found.data) == ("d.zip", ZIP)


def test_boundaries_as_real_clients_write_them(find: Callable[[bytes], Found]) -> None:
    """A preamble, a boundary line with trailing white space, nested multiparts, LF-only
    line ends, a message without its closing boundary, and an 8bit body that holds
    lines looking almost like a boundary: the ZIP comes out byte for byte."""
    b64 = base64.encodebytes(ZIP).replace(b"\n", b"\r\n")
    raw = (b"From: a@acme.example\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"OUT\"\r\n\r\n"
           b"This is a multi-part message in MIME format.\r\n"
           b"--OUT \t\r\nContent-Type: multipart/alternative; boundary=IN\r\n\r\n"
           b"--IN\r\nContent-Type: text/plain\r\n\r\n--OUTSIDE is not a boundary\r\n"
           b"--IN\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--IN--\r\n"
           b"--OUT\r\nContent-Type: application/zip; name=d.zip\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--OUT")
    assert find(raw).data == ZIP
    assert find(raw.replace(b"\r\n", b"\n")).data == ZIP


def test_the_fixture_emails(find: Callable[[bytes], Found]) -> None:
    """Every QA fixture: the stdlib's full parse and the streaming reader agree."""
    from email import message_from_bytes  # noqa: PLC0415

    for path in sorted((Path(__file__).parents[1] / "fixtures" / "emails").glob("*.eml")):
        raw = path.read_bytes()
        full = message_from_bytes(raw, policy=policy.default)
        zips = [p for p in full.iter_attachments()  # type: ignore[attr-defined]
                if str(p.get_filename() or "").lower().endswith(".zip")]
        if len(zips) == 1:
            assert find(raw).data == zips[0].get_payload(decode=True), path.name
        else:
            with pytest.raises(MessageError):
                find(raw)


def test_from_header_addresses() -> None:
    """Display names are dropped and addresses lower-cased."""
    raw = EmailMessage(policy=policy.SMTP)
    raw["From"] = "Acme Data <Data-Team@Acme.Example>"
    raw.set_content("x")
    assert header_addresses(raw.as_bytes(), "From") == ["data-team@acme.example"]


def test_a_part_ends_before_the_line_break_of_its_boundary(
        find: Callable[[bytes], Found]) -> None:
    """Unencoded: the part's bytes are exactly what stands between its header block and
    the line break before the boundary, also when the closing boundary ends the file
    without a line break of its own."""
    body = b"PK\x03\x04 raw bytes\r\nsecond line"
    raw = (b"From: a@acme.example\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: application/zip; name=d.zip\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n" + body + b"\r\n--B--")
    assert find(raw).data == body
    assert find(raw + b"\r\n epilogue\r\n--B\r\nnot a part\r\n").data == body


def test_a_message_of_too_many_parts_is_refused(find: Callable[[bytes], Found]) -> None:
    parts = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(1200))
    raw = (b"From: a@acme.example\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           + parts + b"--B--\r\n")
    with pytest.raises(MessageError, match="more than 1000 parts"):
        find(raw)
