"""Email messages as clients send them: who sent it, and its one ZIP attachment.

No sockets; a stored message is read from its file line by line, only header blocks
are held, and the ZIP is decoded straight to disk. Real clients' shapes are handled: Outlook's
``application/x-zip-compressed``, Gmail's ``application/zip``, scripts'
``application/octet-stream``; nested multipart/alternative bodies; RFC 2231 and
RFC 2047 encoded file names (the stdlib's ``policy.default`` decodes both);
Content-Disposition inline or attachment.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from purlgate.core.files import private_file
from purlgate.errors import MessageError

ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip",
             "multipart/x-zip"}
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Attachment:
    """The one ZIP of a message, decoded to a file of ours (the name is the client's,
    for replies and the batch record; it never becomes a path)."""

    filename: str
    path: Path
    sha256: str


class _Part:
    """A part's header block (``policy.default``), each value worked out once: every
    look-up of the email package parses its header again, and the walk asks often."""

    def __init__(self, headers: EmailMessage) -> None:
        self.headers = headers

    @cached_property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    @property
    def maintype(self) -> str:
        return self.content_type.split("/")[0]

    @cached_property
    def boundary(self) -> str | None:
        return self.headers.get_boundary()

    @cached_property
    def filename(self) -> str | None:
        return self.headers.get_filename()

    @cached_property
    def disposition(self) -> str | None:
        return self.headers.get_content_disposition()

    @cached_property
    def transfer_encoding(self) -> str:
        return str(self.headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()


@dataclass(frozen=True)
class _Leaf:
    part: _Part  # the part's header block only
    start: int  # its body, as byte offsets in the file
    end: int


def header_addresses(raw: bytes, header: str) -> list[str]:
    """Addresses in one header, from the header block only (no body parsing)."""
    return addresses(BytesHeaderParser(policy=policy.compat32).parsebytes(raw), header)


def addresses(headers: Message, header: str) -> list[str]:
    """The addresses of one header of parsed headers, lower-cased, display names dropped."""
    values = [str(v) for v in headers.get_all(header, [])]
    return [addr.lower() for _, addr in getaddresses(values) if "@" in addr]


def message_id(message: EmailMessage) -> str | None:
    value = message.get("Message-ID")
    return str(value).strip() if value else None


LINE_PIECE = 64 * 1024  # a body line is read in pieces of at most this much
MAX_DEPTH = 16  # multiparts nested deeper are taken as leaves (no mail client nests so)
MAX_PARTS = 1000  # more is not a client's data file (and costs a parse each)


def _headers(f: BinaryIO) -> EmailMessage:
    """The header block at the file's position (up to its blank line), parsed."""
    block = bytearray()
    while line := f.readline(LINE_PIECE):
        block += line
        if line in (b"\r\n", b"\n") or len(block) > 1 << 20:
            break
    headers = BytesHeaderParser(policy=policy.default).parsebytes(bytes(block))
    assert isinstance(headers, EmailMessage)
    return headers


def _leaves(f: BinaryIO) -> tuple[EmailMessage, list[_Leaf]]:
    """The message's headers and its leaf parts, read line by line from the file: only
    header blocks are held, never a body (RFC 2046 multipart, nested; a boundary line
    may carry trailing white space; the line break before a boundary belongs to it)."""
    headers = _headers(f)
    top = _Part(headers)
    if top.maintype != "multipart" or not top.boundary:
        body = f.tell()
        f.seek(0, 2)
        return headers, [_Leaf(top, body, f.tell())]
    leaves: list[_Leaf] = []
    bounds = [("--" + top.boundary).encode()]
    current: tuple[_Part, int] | None = None  # a leaf being read, from here
    eol = 0  # length of the previous line's line break
    at_line_start = True
    while True:
        where = f.tell()
        line = f.readline(LINE_PIECE)
        if not line:
            break
        starts = at_line_start
        at_line_start = line.endswith(b"\n")
        whole = at_line_start or len(line) < LINE_PIECE  # a last line may lack its break
        text = line.rstrip(b"\r\n \t") if starts and whole else b""
        hit = next((i for i, b in enumerate(bounds) if text in (b, b + b"--")), None)
        if hit is None:
            eol = len(line) - len(line.rstrip(b"\r\n")) if at_line_start else 0
            continue
        if current is not None:
            leaves.append(_Leaf(current[0], current[1], max(current[1], where - eol)))
            current = None
        if text != bounds[hit]:
            del bounds[hit:]  # the close of that multipart (and of any inside it)
            continue  # its epilogue is ignored
        del bounds[hit + 1:]  # an outer boundary also ends the parts inside it
        if len(leaves) >= MAX_PARTS:
            raise MessageError(f"the message has more than {MAX_PARTS} parts; send the ZIP "
                               "attached to a plain message")
        part = _Part(_headers(f))
        if part.maintype == "multipart" and part.boundary and len(bounds) < MAX_DEPTH:
            bounds.append(("--" + part.boundary).encode())
        else:
            current = (part, f.tell())
        eol = 0
    if current is not None:  # no closing boundary: the part runs to the end
        leaves.append(_Leaf(current[0], current[1], f.tell()))
    return headers, leaves


def _decode_to(f: BinaryIO, leaf: _Leaf, out: Callable[[bytes], object] | None,
               limit: int = -1) -> bytes:
    """Decode a leaf's body (base64, quoted-printable or as it is), handing the pieces to
    ``out``; without ``out``, return its first ``limit`` decoded bytes."""
    cte = leaf.part.transfer_encoding
    f.seek(leaf.start)
    left = leaf.end - leaf.start
    head = bytearray()
    pending = b""
    while left > 0:
        line = f.readline(min(LINE_PIECE, left))
        if not line:
            break
        left -= len(line)
        if cte == "base64":
            chunk = pending + b"".join(line.split())
            usable = len(chunk) - len(chunk) % 4
            chunk, pending = chunk[:usable], chunk[usable:]
            try:
                data = binascii.a2b_base64(chunk)
            except binascii.Error:
                data = b""
        elif cte == "quoted-printable":
            data = binascii.a2b_qp(line)
        else:
            data = line
        if out is not None:
            out(data)
        else:
            head += data
            if len(head) >= limit:
                return bytes(head[:limit])
    return bytes(head)


def _looks_like_zip(f: BinaryIO, leaf: _Leaf, name: str | None) -> bool:
    ctype = leaf.part.content_type
    if ctype in ZIP_TYPES:
        return True
    if name and name.lower().endswith(".zip"):
        return True
    if ctype == "application/octet-stream":
        return _decode_to(f, leaf, None, 4) in ZIP_MAGIC
    return False


def raw_headers(path: Path, offset: int = 0, limit: int = 1 << 20) -> bytes:
    """The header block of a stored message as bytes, up to its blank line (at most
    ``limit`` bytes): what the sender checks read of a trusted MTA's results."""
    lines: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        f.seek(offset)
        while size < limit and (line := f.readline(LINE_PIECE)):
            lines.append(line)
            size += len(line)
            if line in (b"\r\n", b"\n"):
                break
    return b"".join(lines)


def read_headers(path: Path, offset: int = 0) -> EmailMessage:
    """The header block of the message stored in ``path`` from ``offset`` (a spool file
    has its envelope line first); the body is not read (the stdlib's header parser
    would keep all of it as the payload)."""
    with path.open("rb") as f:
        f.seek(offset)
        return _headers(f)


def zip_attachment(path: Path, target: Path, *, offset: int = 0
                   ) -> tuple[EmailMessage, Attachment]:
    """The message's headers and its one ZIP attachment, decoded into ``target`` as it
    is read (a message is never held whole in memory). None or several ZIPs is the
    client's error (MessageError)."""
    with path.open("rb") as f:
        f.seek(offset)
        top, leaves = _leaves(f)
        found: list[tuple[_Leaf, str | None]] = []
        for leaf in leaves:
            name = leaf.part.filename
            if leaf.part.disposition is None and not name and leaf.part.maintype == "text":
                continue  # a body, not an attachment
            if leaf.end > leaf.start and _looks_like_zip(f, leaf, name):
                found.append((leaf, name))
        if not found:
            raise MessageError(
                "the message has no ZIP attachment; attach the data file zipped with the "
                "agreed password (AES-256)")
        if len(found) > 1:
            names = ", ".join(_safe_name(n) for _, n in found)
            raise MessageError(
                f"the message has {len(found)} ZIP attachments ({names}); send one ZIP per "
                "message")
        leaf, name = found[0]
        digest = hashlib.sha256()
        with private_file(target) as out:

            def write(data: bytes) -> None:
                digest.update(data)
                out.write(data)

            _decode_to(f, leaf, write)
        return top, Attachment(_safe_name(name), target, digest.hexdigest())


def _safe_name(name: str | None) -> str:
    return (name or "attachment.zip").replace("/", "_").replace("\\", "_")


VALIDATE_TAG = "validate"  # local+validate@domain: check the file, process nothing


def inbound_of(address: str, inbound: Collection[str]) -> tuple[str, bool] | None:
    """(the inbound address, whether it asks for validation only) that ``address`` is,
    or None: ``sftp-usa@x`` itself, or its ``sftp-usa+validate@x`` sub-address (the
    plus form mail providers use); no other sub-address is ours."""
    lowered = address.lower()
    if lowered in inbound:
        return lowered, False
    local, at, domain = lowered.rpartition("@")
    base, plus, tag = local.partition("+")
    if at and plus and tag == VALIDATE_TAG and f"{base}@{domain}" in inbound:
        return f"{base}@{domain}", True
    return None
