"""A real DNS server for the sender checks (dnslib's, on 127.0.0.1, port 0) serving the
test domains' SPF, DKIM and DMARC records with keys made here, and mail signed with
them as a client's mail servers (or a forwarder) would sign it."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR, TXT
from dnslib.server import DNSLogger, DNSServer


@cache
def key_pair(name: str) -> tuple[bytes, str]:
    """(PKCS#1 private key PEM, the DKIM record's p= value) of a test key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(public).decode()


@dataclass
class Zones:
    """Names to TXT records; names under ``slow`` are answered only after ``delay``."""

    txt: dict[str, list[str]] = field(default_factory=dict)
    slow: set[str] = field(default_factory=set)
    delay: float = 3.0
    queries: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: object, handler: object) -> object:
        q = request.q  # type: ignore[attr-defined]
        name = str(q.qname).rstrip(".").lower()
        with self.lock:
            self.queries.append(f"{name} {QTYPE[q.qtype]}")
        if any(name == s or name.endswith("." + s) for s in self.slow):
            time.sleep(self.delay)
        reply = request.reply()  # type: ignore[attr-defined]
        found = self.txt.get(name)
        if found is None and not any(k.endswith("." + name) for k in self.txt):
            reply.header.rcode = RCODE.NXDOMAIN
        elif found is not None and QTYPE[q.qtype] == "TXT":
            for value in found:
                raw = value.encode()
                parts = [raw[i:i + 255] for i in range(0, len(raw), 255)]
                reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(parts), ttl=300))
        return reply

    def dkim_key(self, selector: str, domain: str) -> bytes:
        private, public = key_pair(f"{selector}.{domain}")
        self.txt[f"{selector}._domainkey.{domain}"] = [f"v=DKIM1; k=rsa; p={public}"]
        return private


class _NoSuchName:
    """Every name: NXDOMAIN, at once (the suite's default DNS: nothing leaves the
    machine, and a sender check costs no wait)."""

    def resolve(self, request: object, handler: object) -> object:
        reply = request.reply()  # type: ignore[attr-defined]
        reply.header.rcode = RCODE.NXDOMAIN
        return reply


class _Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


@pytest.fixture(scope="session", autouse=True)
def _suite_dns() -> Iterator[None]:
    """Regions the tests configure (tests/config_builder.py) look names up here unless
    a test gives its own DNS: checks run offline, and fast."""
    server = DNSServer(_NoSuchName(), address="127.0.0.1", port=0, logger=_Quiet())
    server.start_thread()
    os.environ["PURLGATE_TEST_DNS"] = f"127.0.0.1:{server.server.server_address[1]}"
    yield
    os.environ.pop("PURLGATE_TEST_DNS", None)
    server.stop()
    server.server.server_close()


@pytest.fixture
def dns_server() -> Iterator[tuple[Zones, int]]:
    """(the zones, the port) of a DNS server on 127.0.0.1 with the test domains:
    acme.test (SPF: 127.0.0.1, DKIM s1, DMARC reject), other.test (SPF 127.0.0.1, DKIM
    s1, no DMARC), nodmarc.test (DKIM s1, no DMARC), forwarder.test (SPF: 127.0.0.1,
    ARC key arc), and slow.test (answered too late)."""
    zones = Zones()
    zones.txt.update({
        "acme.test": ["v=spf1 ip4:127.0.0.1 -all"],
        "_dmarc.acme.test": ["v=DMARC1; p=reject; adkim=r; aspf=r"],
        "other.test": ["v=spf1 ip4:127.0.0.1 -all"],
        "nodmarc.test": ["v=spf1 -all"],
        "forwarder.test": ["v=spf1 ip4:127.0.0.1 -all"],
        "_dmarc.slow.test": ["v=DMARC1; p=reject"],
    })
    for domain in ("acme.test", "other.test", "nodmarc.test"):
        zones.dkim_key("s1", domain)
    zones.dkim_key("arc", "forwarder.test")
    zones.slow.add("slow.test")
    server = DNSServer(zones, address="127.0.0.1", port=0, logger=_Quiet())
    server.start_thread()
    yield zones, server.server.server_address[1]
    server.stop()
    server.server.server_close()


def message(sender: str = "data-team@acme.test", body: bytes = b"Here is the file.\r\n",
            extra: bytes = b"") -> bytes:
    return extra + (f"From: Data Team <{sender}>\r\nTo: sftp-usa@idomoo.com\r\n"
                    "Subject: data\r\nMessage-ID: <m1@acme.test>\r\nDate: Sat, 05 Dec 2026 "
                    "10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
                    "\r\n").encode() + body


def signed(raw: bytes, zones: Zones, domain: str = "acme.test",
           selector: str = "s1") -> bytes:
    """``raw`` with a DKIM signature of ``domain``, as its mail server adds it."""
    private = zones.dkim_key(selector, domain)
    return dkim.sign(raw, selector.encode(), domain.encode(), private,
                     include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + raw


def forwarded(raw: bytes, zones: Zones, footer: bytes = b"-- \r\nlist footer\r\n") -> bytes:
    """``raw`` through a forwarder that checked it (DMARC pass), added a footer (which
    breaks the original DKIM signature) and sealed the chain with ARC."""
    results = (b"Authentication-Results: forwarder.test; dkim=pass header.d=acme.test; "
               b"spf=pass smtp.mailfrom=acme.test; dmarc=pass header.from=acme.test\r\n")
    changed = results + raw + footer
    private = zones.dkim_key("arc", "forwarder.test")
    seal = dkim.arc_sign(changed, b"arc", b"forwarder.test", private, b"forwarder.test")
    return b"".join(seal) + changed
