"""The region's sender checks, loaded at the first message that needs them: dkimpy,
dnspython, pyspf and the public suffix list (``sender_auth``) cost a process about
16 MB it need not hold while idle (the mail worker processes start with the gateway)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, BinaryIO

from purlgate.channels.sender_policy import Verdicts
from purlgate.config import DnsConfig, SenderAuthConfig

if TYPE_CHECKING:
    from purlgate.channels.sender_auth import SenderChecks


class LazyChecks:
    """The region's sender checks, built at the first message that needs them."""

    def __init__(self, config: SenderAuthConfig, dns: DnsConfig, *, hostname: str) -> None:
        self.config = config
        self.dns = dns
        self.authserv_id = config.authserv_id or hostname
        self._hostname = hostname
        self._built: SenderChecks | None = None
        self._lock = threading.Lock()

    @property
    def trusts_headers(self) -> bool:
        return self.config.trusted_authserv_id is not None

    def checks(self) -> SenderChecks:
        with self._lock:
            if self._built is None:
                from purlgate.channels.resolver import Resolver  # noqa: PLC0415 - see above
                from purlgate.channels.sender_auth import SenderChecks  # noqa: PLC0415

                self._built = SenderChecks(self.config, Resolver(self.dns),
                                           hostname=self._hostname)
            return self._built

    def verify(self, source: BinaryIO | bytes, *, ip: str | None, helo: str | None,
               mail_from: str) -> Verdicts:
        return self.checks().verify(source, ip=ip, helo=helo, mail_from=mail_from)

    def from_headers(self, headers: bytes) -> Verdicts:
        return self.checks().from_headers(headers)
