"""Email messages as clients send them: who sent it, and its one ZIP attachment.

Pure functions over bytes (no sockets). Real clients' shapes are handled: Outlook's
``application/x-zip-compressed``, Gmail's ``application/zip``, scripts'
``application/octet-stream``; nested multipart/alternative bodies; RFC 2231 and
RFC 2047 encoded file names (the stdlib's ``policy.default`` decodes both);
Content-Disposition inline or attachment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses

from purlgate.errors import MessageError

ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip",
             "multipart/x-zip"}
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    sha256: str


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def header_addresses(raw: bytes, header: str) -> list[str]:
    """Addresses in one header, from the header block only (no body parsing)."""
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    values = [str(v) for v in headers.get_all(header, [])]
    return [addr.lower() for _, addr in getaddresses(values) if "@" in addr]


def subject(message: EmailMessage) -> str:
    return str(message.get("Subject", "")).strip()


def message_id(message: EmailMessage) -> str | None:
    value = message.get("Message-ID")
    return str(value).strip() if value else None


def _looks_like_zip(part: EmailMessage, name: str | None) -> bool:
    ctype = part.get_content_type()
    if ctype in ZIP_TYPES:
        return True
    if name and name.lower().endswith(".zip"):
        return True
    if ctype == "application/octet-stream":
        payload = part.get_payload(decode=True)
        return isinstance(payload, bytes) and payload[:4] in ZIP_MAGIC
    return False


def zip_attachment(message: EmailMessage) -> Attachment:
    """The message's one ZIP attachment; none or several is the client's error."""
    found: list[Attachment] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        name = part.get_filename()
        disposition = part.get_content_disposition()
        if disposition is None and not name and part.get_content_maintype() == "text":
            continue  # a body, not an attachment
        if not _looks_like_zip(part, name):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        found.append(Attachment(
            filename=(name or "attachment.zip").replace("/", "_").replace("\\", "_"),
            data=payload,
            sha256=hashlib.sha256(payload).hexdigest(),
        ))
    if not found:
        raise MessageError(
            "the message has no ZIP attachment; attach the data file zipped with the "
            "agreed password (AES-256)"
        )
    if len(found) > 1:
        names = ", ".join(a.filename for a in found)
        raise MessageError(
            f"the message has {len(found)} ZIP attachments ({names}); send one ZIP per message"
        )
    return found[0]
