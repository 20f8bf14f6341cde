"""The streamed DKIM body hashes equal dkimpy's own, body by body, for both
canonicalizations, l=, and the edge cases (trailing empty lines, whitespace, an empty
body, a bare LF, a last line without its break); and a signature checked that way
verifies (and fails when the body changed), reading the message a piece at a time."""

from __future__ import annotations

import hashlib
import io

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from purlgate.channels.dkim_body import HeaderSigner, body_hashes, wanted
from tests.dns_helpers import key_pair

BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"one line\r\n",
    b"one line",
    b"trailing  \t \r\nspaces\tand\t\ttabs  inside\r\n\r\n\r\n",
    b"  leading\r\n\r\nmiddle empty\r\n \r\n\t\r\n",
    b"bare\nline feeds\n\nand\r\nmixed\n",
    b"last line without its break  ",
    b"x" * 70_000 + b"\r\n" + b"y  \r\n" * 3000,  # across the read pieces
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
@pytest.mark.parametrize("limit", [None, 0, 7, 100])
def test_streamed_digest_equals_dkimpy(body: bytes, canon: bytes, limit: int | None) -> None:
    message = b"From: a@acme.test\r\nSubject: s\r\n\r\n" + body
    _headers, seen = dkim.rfc822_parse(message)
    expected = CanonicalizationPolicy.from_c_value(b"relaxed/" + canon).canonicalize_body(seen)
    if limit is not None:
        expected = expected[:limit]
    key = (canon, b"rsa-sha256", limit)
    stream = io.BytesIO(message)
    stream.readline(), stream.readline(), stream.readline()  # the header block
    assert body_hashes(stream, {key}, piece=4096) == {key: hashlib.sha256(expected).digest()}


def _txt(name: bytes, timeout: float = 5) -> bytes:
    return f"v=DKIM1; k=rsa; p={key_pair('s1.acme.test')[1]}".encode()


@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple")])
@pytest.mark.parametrize("length", [False, True])
def test_a_signature_verifies_from_the_header_block_and_the_streamed_body(
        canon: tuple[bytes, bytes], length: bool) -> None:
    raw = (b"From: a@acme.test\r\nTo: b@x.test\r\nSubject: data\r\n\r\n"
           + b"line with  spaces \r\n" * 5000 + b"\r\n\r\n")
    private, _public = key_pair("s1.acme.test")
    signed = dkim.sign(raw, b"s1", b"acme.test", private, canonicalize=canon,
                       length=length, include_headers=[b"from", b"to", b"subject"]) + raw
    for message, ok in ((signed, True), (signed.replace(b"spaces", b"SPACES", 1), False)):
        head, body = message.split(b"\r\n\r\n", 1)
        headers, _ = dkim.rfc822_parse(head + b"\r\n\r\n")
        digests = body_hashes(io.BytesIO(body), wanted(headers), piece=1000)
        signer = HeaderSigner(head + b"\r\n\r\n", digests)
        if ok:
            assert signer.verify(idx=0, dnsfunc=_txt) is True
            assert dkim.DKIM(message).verify(dnsfunc=_txt) is True  # dkimpy agrees
        else:
            with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
                signer.verify(idx=0, dnsfunc=_txt)
