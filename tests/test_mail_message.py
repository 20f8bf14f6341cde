"""Finding the one ZIP in what real mail clients send."""

from __future__ import annotations

import base64
from email import policy
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from purlgate.channels.mail_message import header_addresses, parse, zip_attachment
from purlgate.errors import MessageError
from tests.mail_helpers import aes_zip, client_mail, rows

ZIP = aes_zip({"a_20261127_101500.csv": rows(3)})


@pytest.mark.parametrize("ctype", ["application/zip", "application/x-zip-compressed",
                                   "application/octet-stream"])
def test_zip_content_types(ctype: str) -> None:
    """Gmail, Outlook and scripts label ZIPs differently; all are found."""
    found = zip_attachment(parse(client_mail([("data.zip", ZIP, ctype)])))
    assert (found.filename, found.data) == ("data.zip", ZIP)


def test_octet_stream_without_zip_name_found_by_content() -> None:
    """An unnamed-looking octet-stream that is a ZIP by its bytes is still the ZIP."""
    found = zip_attachment(parse(client_mail([("export.bin", ZIP, "application/octet-stream")])))
    assert found.data == ZIP


def test_inline_disposition() -> None:
    """Some clients mark attachments inline."""
    assert zip_attachment(parse(client_mail([("d.zip", ZIP, "application/zip")],
                                            disposition="inline"))).data == ZIP


def test_rfc2231_encoded_file_name() -> None:
    """filename*=utf-8''... (RFC 2231), as Thunderbird writes non-ASCII names."""
    outer = MIMEMultipart()
    outer["From"] = "a@acme.example"
    outer.attach(MIMEText("hi"))
    part = MIMEApplication(ZIP, "zip")
    part.add_header("Content-Disposition", "attachment",
                    filename=("utf-8", "", "données_20261127_101500.zip"))
    outer.attach(part)
    assert zip_attachment(parse(outer.as_bytes())).filename == "données_20261127_101500.zip"


def test_rfc2047_encoded_file_name() -> None:
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
    assert zip_attachment(parse(raw)).filename == "Zoë.zip"


def test_body_parts_are_not_attachments() -> None:
    """Text and HTML bodies are skipped; no ZIP is the client's error."""
    with pytest.raises(MessageError):
        zip_attachment(parse(client_mail([])))


def test_other_attachments_are_ignored() -> None:
    """A signature image beside the ZIP is not counted."""
    msg = parse(client_mail([("logo.png", b"\x89PNG....", "image/png"),
                             ("d.zip", ZIP, "application/zip")]))
    assert zip_attachment(msg).filename == "d.zip"


def test_from_header_addresses() -> None:
    """Display names are dropped and addresses lower-cased."""
    raw = EmailMessage(policy=policy.SMTP)
    raw["From"] = "Acme Data <Data-Team@Acme.Example>"
    raw.set_content("x")
    assert header_addresses(raw.as_bytes(), "From") == ["data-team@acme.example"]
