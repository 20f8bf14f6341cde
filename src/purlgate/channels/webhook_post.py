"""One webhook attempt: the body signed as Standard Webhooks say, POSTed, the answer.

The signature is the Standard Webhooks one (made by its reference library,
``standardwebhooks``): ``webhook-signature: v1,<base64 HMAC-SHA256 of
"<webhook-id>.<webhook-timestamp>.<body>">`` keyed by the endpoint's secret
(``whsec_`` and base64), so a receiver verifies it with any of the specification's
libraries. The timestamp is the attempt's (verifiers refuse old ones), the id the
event's (the same on every attempt: a receiver drops repeats by it).

An attempt is bounded in time as a whole (``timeout_seconds``, redirects included). A
redirect is followed only when it keeps the method and body (307, 308) and stays on the
endpoint's origin (scheme, host and port), at most three times: the signed event never
goes where it was not configured to go.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urljoin

import aiohttp
from standardwebhooks.webhooks import Webhook

from purlgate import __version__
from purlgate.config import WebhookDeliveryConfig, origin
from purlgate.errors import ConfigError

MAX_REDIRECTS = 3
READ_AT_MOST = 64 * 1024  # of an answer's body (never kept, never logged)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


def check_secret(value: bytes) -> str:
    """The endpoint's secret as Standard Webhooks take it (``whsec_`` and the base64 of
    24 to 64 bytes); a ConfigError saying what is wrong, never the value."""
    text = value.decode("ascii", errors="replace").strip()
    if not text.startswith(SECRET_PREFIX):
        raise ConfigError("a webhook secret must start with whsec_ (make one with "
                          "`purlgate webhook-secret`)")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except binascii.Error as exc:
        raise ConfigError("a webhook secret must be whsec_ followed by base64") from exc
    if not 24 <= len(key) <= 64:
        raise ConfigError("a webhook secret must hold 24 to 64 bytes (base64 after whsec_)")
    return text


def signed_headers(secret: str, event_id: str, at: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt at ``at`` (Unix seconds)."""
    signature = Webhook(secret).sign(event_id, datetime.fromtimestamp(at, UTC), body)
    return {"webhook-id": event_id, "webhook-timestamp": str(at),
            "webhook-signature": signature, "Content-Type": "application/json",
            "User-Agent": f"purlgate-webhooks/{__version__}"}


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (timeout, refused, TLS)
    detail: str  # for the log and the entry's last error: no path, query or body

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


class Poster:
    """POSTs attempts over one connection pool; open in the event loop that uses it."""

    def __init__(self, config: WebhookDeliveryConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls: ssl.SSLContext | bool = True
            if self.config.ca_file is not None:
                tls = ssl.create_default_context(cafile=str(self.config.ca_file))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_connections, ssl=tls),
                trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, *, event_id: str, body: bytes, secret: str) -> Answer:
        """One attempt (see the module docstring): never raises for the network."""
        seconds = self.config.timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                return await self._follow(url, event_id=event_id, body=body, secret=secret)
        except TimeoutError:
            return Answer(None, f"no answer within {seconds:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Answer(None, _no_answer(exc))

    async def _follow(self, url: str, *, event_id: str, body: bytes, secret: str) -> Answer:
        target = url
        for _hop in range(MAX_REDIRECTS + 1):
            headers = signed_headers(secret, event_id, int(time.time()), body)
            async with self._open().post(target, data=body, headers=headers,
                                         allow_redirects=False) as response:
                await response.content.read(READ_AT_MOST)
                status, location = response.status, response.headers.get("Location")
            if not 300 <= status < 400:
                return Answer(status, f"answered {status}")
            if status not in (307, 308) or not location:
                return Answer(status, f"answered {status}: a redirect is followed only "
                                      "as a 307 or 308 to the same origin")
            following = urljoin(target, location)
            if origin(following) != origin(url):
                return Answer(status, f"answered {status} to {origin(following)}: a "
                                      "redirect to another origin is not followed")
            target = following
        return Answer(status, f"more than {MAX_REDIRECTS} redirects")


def _no_answer(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "the endpoint's TLS certificate was not trusted"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return f"no answer ({type(exc).__name__})"
