"""DNS for the sender checks: dnspython, on the region's servers, answers cached for
their TTL, every lookup bounded in time.

An answer that says a name has no such record (NXDOMAIN, no data) is an answer: the
check goes on without it. No answer at all (a timeout, every server failing, SERVFAIL)
is a ``DnsUnavailableError``: the check that needed it is a temporary error, never a
silent pass or fail. The adapters give dkimpy and pyspf their lookups through this one
resolver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from purlgate.config import DnsConfig, split_server


class DnsUnavailableError(Exception):
    """No answer to a lookup (timeout, no server answering): try again later."""


class Resolver:
    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        try:
            resolver = dns.resolver.Resolver(configure=not config.servers)
        except dns.resolver.NoResolverConfiguration:
            # No /etc/resolv.conf (a bare container): every lookup is "no answer", so
            # the checks say temperror, and check-config's report says why.
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = []
        if config.servers:
            resolver.nameservers = [split_server(s)[0] for s in config.servers]
            resolver.nameserver_ports = {split_server(s)[0]: split_server(s)[1]
                                         for s in config.servers}
        if config.timeout_seconds is not None:
            resolver.lifetime = config.timeout_seconds
            resolver.timeout = config.timeout_seconds
        resolver.cache = dns.resolver.LRUCache(4096)  # keeps each answer for its TTL
        self._resolver = resolver

    def records(self, name: str, kind: str) -> list[Any]:
        """The ``kind`` records of ``name`` (none when it has none)."""
        try:
            answer = self._resolver.resolve(name, kind, raise_on_no_answer=False,
                                            search=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers,
                dns.resolver.LifetimeTimeout) as exc:
            raise DnsUnavailableError(f"no answer for {name} ({kind})") from exc
        except dns.exception.DNSException as exc:  # a malformed name or answer
            raise DnsUnavailableError(f"no usable answer for {name} ({kind})") from exc
        return list(answer.rrset or [])

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined."""
        return [b"".join(r.strings) for r in self.records(name, "TXT")]

    # -- the libraries' lookups ----------------------------------------------------

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the key record, or None when there is none."""
        text = name.decode() if isinstance(name, bytes) else name
        found = self.txt(text.rstrip("."))
        return found[0] if found else None

    def spf_lookup(self, name: str, qtype: str, strict: bool = True,
                   timeout: float = 30) -> Sequence[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup``: ((name, type), value) pairs; no answer raises its
        TempError (its temperror verdict)."""
        import spf  # noqa: PLC0415 - with the checks

        try:
            records = self.records(name, qtype)
        except DnsUnavailableError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        found: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), r.address))
            elif qtype == "MX":
                found.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), r.strings))
        return found
