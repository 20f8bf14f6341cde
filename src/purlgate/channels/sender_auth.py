"""Who really sent a mail: SPF, DKIM, DMARC and ARC verdicts, and what a client's policy
makes of them.

Checked here (SMTP straight from the client's mail servers): SPF of the connecting
address and MAIL FROM (pyspf), every DKIM signature (dkimpy), DMARC of the From domain
(its ``_dmarc`` record, else its organizational domain's, found with the public suffix
list; SPF or DKIM aligned, relaxed or strict as the record says), and the ARC chain
(dkimpy) when there is one. A DMARC failure becomes a pass only when the chain
validates, its newest seal is by a configured trusted sealer, and that chain's first
hop recorded a DMARC pass: a forward (a list, a forwarding service) that broke the
alignment. Every lookup goes through ``resolver.Resolver``; one that gets no answer
makes its check a ``temperror``.

Read instead (behind a trusted MTA, and for the IMAP mailbox): the topmost
``Authentication-Results`` header of the configured trusted authserv-id. Every other
such header is ignored: a sender can write one.

What a client's policy makes of the verdicts is ``sender_policy.decide``. This module
and its libraries load at the first check (``sender_policy.LazyChecks``).
"""

from __future__ import annotations

import io
import re
import threading
from email.utils import getaddresses
from functools import cache
from typing import BinaryIO

import authres
import dkim
import spf
from publicsuffixlist import PublicSuffixList

from purlgate.channels.dkim_body import HeaderSigner, Key, body_hashes, wanted
from purlgate.channels.resolver import DnsUnavailableError, Resolver
from purlgate.channels.sender_policy import Verdicts
from purlgate.config import SenderAuthConfig

_SPF_LOCK = threading.Lock()  # pyspf looks names up through one module global


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organizational domain (the registrable one) of ``domain``."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def _aligned(a: str | None, b: str | None, mode: str) -> bool:
    if not a or not b:
        return False
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


def _header_block(source: BinaryIO, limit: int = 1 << 20) -> bytes:
    """The header block ``source`` starts with, up to and with its blank line (at most
    ``limit`` bytes); ``source`` is left at the body."""
    lines: list[bytes] = []
    size = 0
    while size < limit and (line := source.readline(1 << 16)):
        lines.append(line)
        size += len(line)
        if line in (b"\r\n", b"\n"):
            break
    return b"".join(lines)


def from_address(headers: bytes) -> tuple[str | None, str | None]:
    """(the From address, its domain) of a header block; (None, None) unless it has
    exactly one From header with exactly one address."""
    parsed, _ = dkim.rfc822_parse(headers + (b"" if headers.endswith(b"\r\n\r\n")
                                             else b"\r\n"))
    values = [v.decode("utf-8", "replace").replace("\r\n", "")
              for k, v in parsed if k.lower() == b"from"]
    if len(values) != 1:
        return None, None
    addresses = [a for _n, a in getaddresses(values) if "@" in a]
    if len(addresses) != 1:
        return None, None
    return addresses[0].lower(), addresses[0].rsplit("@", 1)[1].lower().rstrip(".")


class SenderChecks:
    """The region's checker: its resolver, its id, and whom it trusts."""

    def __init__(self, config: SenderAuthConfig, resolver: Resolver, *,
                 hostname: str) -> None:
        self.config = config
        self.resolver = resolver
        self.authserv_id = config.authserv_id or hostname
        self.trusted_sealers = {d.lower().rstrip(".") for d in config.trusted_arc_sealers}

    @property
    def trusts_headers(self) -> bool:
        return self.config.trusted_authserv_id is not None

    # -- checked here ----------------------------------------------------------------

    def verify(self, source: BinaryIO | bytes, *, ip: str | None, helo: str | None,
               mail_from: str) -> Verdicts:
        """The verdicts of the message ``source`` reads (from its first header line),
        received from ``ip``. Read once, a piece at a time: the header block is held,
        the body only hashed (``dkim_body``); a message with an ARC chain is read whole
        to check the chain."""
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        start = source.tell()
        head = _header_block(source)
        headers, _ = dkim.rfc822_parse(head)
        digests = body_hashes(source, wanted(headers))
        _address, from_domain = from_address(head)
        spf_result = self._spf(ip, helo, mail_from)
        spf_domain = mail_from.rsplit("@", 1)[1].lower() if "@" in mail_from else helo
        dkims = self._dkim(head, headers, digests)
        arc, arc_dmarc_pass, sealer = self._arc(source, start, headers)
        notes: list[str] = []
        if from_domain is None:
            return Verdicts(self.authserv_id, None, spf_result, spf_domain, dkims,
                            dmarc="permerror", arc=arc, notes=("not one From address",))
        dmarc, policy, dkim_aligned = self._dmarc(from_domain, spf_result, spf_domain, dkims)
        if dmarc == "fail" and arc == "pass" and arc_dmarc_pass \
                and sealer in self.trusted_sealers:
            dmarc = "pass"
            notes.append(f"dmarc passed at the first hop, ARC sealed by {sealer}")
        return Verdicts(self.authserv_id, from_domain, spf_result, spf_domain, dkims,
                        dkim_aligned, dmarc, policy, arc, tuple(notes))

    def _spf(self, ip: str | None, helo: str | None, mail_from: str) -> str:
        if not ip:
            return "none"
        with _SPF_LOCK:
            spf.DNSLookup = self.resolver.spf_lookup
            result, _explanation = spf.check2(i=ip, s=mail_from, h=helo or "",
                                              querytime=self.resolver.config.timeout_seconds
                                              or 20)
        return str(result or "none")

    def _dkim(self, head: bytes, headers: list[list[bytes]],
              digests: dict[Key, bytes]) -> tuple[tuple[str, str], ...]:
        count = sum(1 for name, _v in headers if name.lower() == b"dkim-signature")
        if not count:
            return ()
        signer = HeaderSigner(head, digests)
        found = []
        for idx in range(count):
            try:
                ok = signer.verify(idx=idx, dnsfunc=self.resolver.dkim_txt)
                result = "pass" if ok else "fail"
            except DnsUnavailableError:
                result = "temperror"
            except dkim.ValidationError:  # a body or header that does not match
                result = "fail"
            except dkim.DKIMException:  # a malformed signature
                result = "permerror"
            domain = signer.signature_fields.get(b"d", b"").decode("ascii", "replace")
            found.append((domain.lower(), result))
        return tuple(found)

    def _dmarc(self, from_domain: str, spf_result: str, spf_domain: str | None,
               dkims: tuple[tuple[str, str], ...]) -> tuple[str, str | None, bool]:
        """(result, policy, a DKIM pass aligned (relaxed) with From)."""
        try:
            record, at_org = self.dmarc_record(from_domain)
        except DnsUnavailableError:
            relaxed = any(r == "pass" and _aligned(d, from_domain, "r") for d, r in dkims)
            return "temperror", None, relaxed
        tags = record or {}
        adkim, aspf = tags.get("adkim", "r"), tags.get("aspf", "r")
        dkim_aligned = any(r == "pass" and _aligned(d, from_domain, adkim) for d, r in dkims)
        if record is None:
            return "none", None, any(r == "pass" and _aligned(d, from_domain, "r")
                                     for d, r in dkims)
        policy = tags.get("sp", tags.get("p")) if at_org else tags.get("p")
        spf_aligned = spf_result == "pass" and _aligned(spf_domain, from_domain, aspf)
        if dkim_aligned or spf_aligned:
            return "pass", policy, dkim_aligned
        if spf_result == "temperror" or any(r == "temperror" for _d, r in dkims):
            return "temperror", policy, dkim_aligned
        return "fail", policy, dkim_aligned

    def dmarc_record(self, domain: str) -> tuple[dict[str, str] | None, bool]:
        """The DMARC record's tags for ``domain`` (its own, else its organizational
        domain's: True), or (None, False)."""
        for name, at_org in ((domain, False), (org_domain(domain), True)):
            if at_org and name == domain:
                break
            for txt in self.resolver.txt(f"_dmarc.{name}"):
                text = txt.decode("ascii", "replace")
                if re.match(r"\s*v\s*=\s*DMARC1\s*(;|$)", text, re.IGNORECASE):
                    tags = {
                        k.strip().lower(): v.strip().lower()
                        for k, _, v in (part.partition("=") for part in text.split(";"))
                        if k.strip()}
                    if tags.get("p") in ("none", "quarantine", "reject"):
                        return tags, at_org
        return None, False

    def _arc(self, source: BinaryIO, start: int,
             headers: list[list[bytes]]) -> tuple[str, bool, str | None]:
        """(chain result, its first hop recorded a DMARC pass, the newest sealer)."""
        seals = [(v, k) for k, v in headers if k.lower() == b"arc-seal"]
        if not seals:
            return "none", False, None
        source.seek(start)  # a forwarded message: dkimpy checks the chain on all of it
        message = source.read()
        try:
            cv, _results, _comment = dkim.ARC(message).verify(dnsfunc=self.resolver.dkim_txt)
        except (DnsUnavailableError, dkim.DKIMException):
            return "fail", False, None
        result = cv.decode() if isinstance(cv, bytes) else "fail"
        newest = max(seals, key=lambda s: _instance(s[0]))[0]
        sealer = _tag(newest, b"d")
        first_results = [v for k, v in headers if k.lower() == b"arc-authentication-results"
                         and _instance(v) == 1]
        dmarc_pass = any(re.search(rb"\bdmarc\s*=\s*pass\b", v, re.IGNORECASE)
                         for v in first_results)
        return result, dmarc_pass, sealer

    # -- read from a trusted MTA -----------------------------------------------------

    def from_headers(self, headers: bytes) -> Verdicts:
        """The verdicts the trusted authserv-id recorded (its topmost header); all
        'none', with a note, when it recorded none."""
        trusted = (self.config.trusted_authserv_id or "").lower()
        _address, from_domain = from_address(headers)
        parsed, _ = dkim.rfc822_parse(headers)
        for name, value in parsed:
            if name.lower() != b"authentication-results":
                continue
            text = value.decode("utf-8", "replace").replace("\r\n", " ")
            try:
                header = authres.AuthenticationResultsHeader.parse(
                    f"Authentication-Results: {text}")
            except authres.core.AuthResError:
                continue
            if str(header.authserv_id).lower() == trusted:
                return self._read(header, from_domain)
        return Verdicts(trusted, from_domain,
                        notes=(f"no Authentication-Results from {trusted}",))

    def _read(self, header: authres.AuthenticationResultsHeader,
              from_domain: str | None) -> Verdicts:
        got: dict[str, str] = {}
        dkims: list[tuple[str, str]] = []
        spf_domain = None
        for result in header.results:
            method, verdict = str(result.method).lower(), str(result.result).lower()
            props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties}
            if method == "dkim" and verdict != "none":
                domain = props.get("header.d") or props.get("header.i", "").rsplit("@", 1)[-1]
                dkims.append((domain.lower(), verdict))
            elif method in ("spf", "dmarc", "arc"):
                got.setdefault(method, verdict)
                if method == "spf":
                    spf_domain = props.get("smtp.mailfrom", "").rsplit("@", 1)[-1] or None
        aligned = any(r == "pass" and _aligned(d, from_domain, "r") for d, r in dkims)
        return Verdicts(str(header.authserv_id), from_domain, got.get("spf", "none"),
                        spf_domain, tuple(dkims), aligned, got.get("dmarc", "none"),
                        None, got.get("arc", "none"))


def _instance(value: bytes) -> int:
    found = re.search(rb"(?:^|;)\s*i\s*=\s*(\d+)", value)
    return int(found.group(1)) if found else 0


def _tag(value: bytes, tag: bytes) -> str | None:
    found = re.search(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;\s]+)", value)
    return found.group(1).decode("ascii", "replace").lower() if found else None
