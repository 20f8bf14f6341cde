"""DKIM without holding the message: its body hashes computed as the body streams by.

dkimpy verifies a signature over a message held whole in memory (split into lines,
then canonicalized in copies): about four times a message's size, 75 MB for a 20 MB
data file. Here the body is read once, a line at a time, into one hasher per
(canonicalization, hash, l=) the message's signatures ask for (RFC 6376 3.4.3 and
3.4.4, as dkimpy canonicalizes: trailing empty lines dropped, relaxed whitespace
reduced); dkimpy then checks each signature's body hash against these digests and
verifies the header signature on the header block alone (``HeaderSigner``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

_HASHES: dict[bytes, Callable[[], Any]] = {
    b"rsa-sha1": hashlib.sha1, b"rsa-sha256": hashlib.sha256,
    b"ed25519-sha256": hashlib.sha256}
_WSP = re.compile(rb"[\t ]+")
_TRAILING_WSP = re.compile(rb"[\t ]+$")

Key = tuple[bytes, bytes, int | None]  # body canonicalization, a=, l=


class _Canonical:
    """One canonical body, hashed as it is made."""

    def __init__(self, relaxed: bool, algorithm: bytes, limit: int | None) -> None:
        self.relaxed = relaxed
        self.hash = _HASHES[algorithm]()
        self.left = limit  # bytes still hashed (l=), None: all
        self.empty = 0  # empty lines held back: dropped if nothing follows
        self.any = False

    def _emit(self, data: bytes) -> None:
        if self.left is not None:
            data = data[:self.left]
            self.left -= len(data)
        self.hash.update(data)

    def line(self, text: bytes, *, ended: bool) -> None:
        if self.relaxed:
            text = _WSP.sub(b" ", text)
            if ended:  # dkimpy strips trailing space only before a line break
                text = _TRAILING_WSP.sub(b"", text)
        if not text and ended:
            self.empty += 1
            return
        if self.empty:
            self._emit(b"\r\n" * self.empty)
            self.empty = 0
        self._emit(text + b"\r\n")
        self.any = True

    def digest(self) -> bytes:
        if not self.any and not self.relaxed:
            self._emit(b"\r\n")  # an empty body is one CRLF (simple), nothing (relaxed)
        return bytes(self.hash.digest())


def wanted(headers: Iterable[tuple[bytes, bytes]]) -> set[Key]:
    """The (canonicalization, algorithm, l=) of each well-formed DKIM signature."""
    found: set[Key] = set()
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            tags = parse_tag_value(value)
            policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
            algorithm = tags[b"a"]
            limit = int(tags[b"l"]) if b"l" in tags else None
        except (InvalidTagValueList, InvalidCanonicalizationPolicyError, KeyError, ValueError):
            continue  # dkimpy reports it when it verifies that signature
        if algorithm in _HASHES:
            found.add((policy.body_algorithm.name, algorithm, limit))
    return found


def body_hashes(body: BinaryIO, keys: set[Key], piece: int = 1 << 16) -> dict[Key, bytes]:
    """Each key's canonical body digest, reading ``body`` (from the blank line on) once."""
    hashers = {k: _Canonical(k[0] == b"relaxed", k[1], k[2]) for k in keys}
    if not hashers:
        return {}
    pending = b""
    while chunk := body.read(piece):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for raw in lines:
            text = raw[:-1] if raw.endswith(b"\r") else raw
            for hasher in hashers.values():
                hasher.line(text, ended=True)
    if pending:
        for hasher in hashers.values():
            hasher.line(pending, ended=False)
    return {k: h.digest() for k, h in hashers.items()}


class HeaderSigner(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's verifier on the header block alone: each signature's body hash is
    checked against the digests streamed from the body (``body_hashes``)."""

    def __init__(self, header_block: bytes, digests: dict[Key, bytes]) -> None:
        super().__init__(header_block + (b"" if header_block.endswith(b"\r\n\r\n")
                                         else b"\r\n"), minkey=1024)
        self.digests = digests

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        if b"bh" in sig:
            try:
                policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            except InvalidCanonicalizationPolicyError as exc:
                raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from exc
            key = (policy.body_algorithm.name, sig[b"a"],
                   int(sig[b"l"]) if b"l" in sig else None)
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            if self.digests.get(key) != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}  # checked: the headers now
        result: bool = super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        return result
