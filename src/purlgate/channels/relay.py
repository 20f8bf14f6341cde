"""The relay connection cache: replies and notifications handed to the relay over kept
connections, and the relay's answers sorted into temporary or permanent failures once,
here at the edge (``map_httpcore_exceptions``'s habit).

As Postfix's connection cache: after a delivery its connection is kept for the next
message, for ``keep_connections_seconds`` (then closed with QUIT) and at most 300 s in
all; a kept connection is checked with RSET before it carries a message, so a relay
that closed it meanwhile costs a new connection, never the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiosmtplib

from purlgate.channels.relay_data import Outgoing, send_streamed
from purlgate.config import RelayConfig
from purlgate.core.files import write_json
from purlgate.errors import PermanentDeliveryError, StorageError, TemporaryDeliveryError

log = logging.getLogger("purlgate.relay")

# Hands a queued message to the relay (read from its file as it goes), from and to.
Sender = Callable[[Outgoing, str, Sequence[str]], Awaitable[None]]


REUSE_SECONDS = 300.0  # a connection's whole life (Postfix's smtp_connection_reuse_time_limit)


@dataclass
class _Kept:
    client: aiosmtplib.SMTP
    opened: float
    used: float


class RelayLimit:
    """The largest message the relay takes: the SIZE its EHLO announces (learned by the
    gateway's connections, kept in a file so that the mail worker processes know it
    too) or ``relay.max_message_bytes``, whichever is smaller; None: no limit known."""

    def __init__(self, path: Path, configured: int | None) -> None:
        self.path = path
        self.configured = configured
        self._learned: int | None = None

    def learn(self, size: int) -> None:
        """The relay's SIZE, as its EHLO said (0: it names no limit)."""
        if size == self._learned:
            return
        self._learned = size
        try:
            write_json(self.path, {"size": size, "at": time.time()})
        except (OSError, StorageError) as exc:  # learned again at the next connection
            self._learned = None
            log.warning("could not keep the relay's SIZE (%s)",
                        getattr(exc, "message", None) or exc)
        log.info("the relay takes messages of at most %s", f"{size} bytes" if size
                 else "any size (it names no SIZE)")

    def learned(self) -> int | None:
        """The SIZE this process learned, else what the gateway last kept (a worker
        process reads it afresh: the gateway learns it)."""
        if self._learned is not None:
            return self._learned
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads(self.path.read_bytes())["size"])
        return None

    def current(self) -> int | None:
        found = [n for n in (self.learned(), self.configured) if n]
        return min(found) if found else None


class RelayConnections:
    """Deliver through the configured relay; failures sorted into temporary/permanent.

    As Postfix's connection cache: after a delivery its connection is kept for the next
    message, for ``keep_connections_seconds`` (then closed with QUIT) and at most 300 s
    in all; a kept connection is checked with RSET before it carries a message, so a
    relay that closed it meanwhile costs a new connection, never the message. One
    message per connection at a time; the outbox bounds how many are open.
    """

    def __init__(self, relay: RelayConfig,
                 clock: Callable[[], float] = time.monotonic,
                 on_size: Callable[[int], None] | None = None) -> None:
        self.relay = relay
        self.on_size = on_size  # told the SIZE each new connection's EHLO announces
        self._password = relay.password.reveal().decode() if relay.password else None
        self._clock = clock
        self._kept: list[_Kept] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Task[None]] = set()

    async def __call__(self, message: Outgoing, sender: str,
                       recipients: Sequence[str]) -> None:
        # Opened first: an entry gone or unreadable is the outbox's to handle (a storage
        # fault), not the relay's failure.
        source = await asyncio.to_thread(message.open)
        try:
            await self._deliver(source, message.size, sender, recipients)
        finally:
            await asyncio.to_thread(source.close)

    async def _deliver(self, source: BinaryIO, size: int, sender: str,
                       recipients: Sequence[str]) -> None:
        try:
            kept = await self._connection()
            try:
                await send_streamed(kept.client, source, size, sender=sender,
                                    recipients=list(recipients),
                                    timeout=self.relay.timeout_seconds)
            except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPResponseException):
                # The envelope was reset: the connection can carry the next.
                self._keep(kept)
                raise
            except BaseException:
                kept.client.close()
                raise
            self._keep(kept)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(500 <= c < 600 for c in codes):
                raise PermanentDeliveryError(f"recipients refused ({codes})") from exc
            raise TemporaryDeliveryError(f"recipients deferred ({codes})") from exc
        except aiosmtplib.SMTPResponseException as exc:
            said = f"relay answered {exc.code} ({_first_line(exc.message)})"
            if 500 <= exc.code < 600:
                raise PermanentDeliveryError(said) from exc
            raise TemporaryDeliveryError(said) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TemporaryDeliveryError(f"relay unreachable: {type(exc).__name__}") from exc

    async def _connection(self) -> _Kept:
        """The most recently used kept connection that still answers RSET, or a new one."""
        while self._kept:
            kept = self._kept.pop()
            if self._usable(kept):
                try:
                    await kept.client.rset(timeout=min(20.0, self.relay.timeout_seconds))
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    kept.client.close()  # closed by the relay meanwhile: not our message's fault
                    continue
                return kept
            await self._quit(kept)
        relay = self.relay
        client = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, start_tls=relay.starttls,
            username=relay.username, password=self._password, timeout=relay.timeout_seconds,
            cert_bundle=str(relay.ca_file) if relay.ca_file else None)
        try:
            await client.connect()
            if self.on_size is not None:
                if client.is_ehlo_or_helo_needed:  # else its first command would
                    await client.ehlo()
                # Kept in a file when it changed: off the event loop.
                await asyncio.to_thread(self.on_size, _size_of(client))
        except BaseException:
            client.close()
            raise
        now = self._clock()
        return _Kept(client, now, now)

    async def probe(self) -> None:
        """Connect once (EHLO) to learn the relay's SIZE before any reply is built; a
        relay that does not answer now is asked again at the first delivery."""
        try:
            kept = await self._connection()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.info("the relay's SIZE is not known yet (%s)", type(exc).__name__)
            return
        self._keep(kept)

    def _usable(self, kept: _Kept) -> bool:
        now = self._clock()
        return (kept.client.is_connected
                and now - kept.used < self.relay.keep_connections_seconds
                and now - kept.opened < REUSE_SECONDS)

    def _keep(self, kept: _Kept) -> None:
        kept.used = self._clock()
        if not self._usable(kept):
            self._quit_later(kept)
            return
        self._kept.append(kept)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(
                self.relay.keep_connections_seconds, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections kept longer than their time; look again later."""
        self._sweep = None
        stale = [k for k in self._kept if not self._usable(k)]
        self._kept = [k for k in self._kept if k not in stale]
        for kept in stale:
            self._quit_later(kept)
        loop = asyncio.get_running_loop()
        if self._kept:
            wait = min(k.used for k in self._kept) + self.relay.keep_connections_seconds
            self._sweep = loop.call_at(loop.time() + max(0.05, wait - self._clock()),
                                       self._close_idle)

    def _quit_later(self, kept: _Kept) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(kept))
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def _quit(self, kept: _Kept) -> None:
        try:
            if kept.client.is_connected:
                await asyncio.wait_for(kept.client.quit(), timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            kept.client.close()

    async def close(self) -> None:
        """QUIT every kept connection (at shutdown)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        kept, self._kept = self._kept, []
        await asyncio.gather(*(self._quit(k) for k in kept), *self._quitting)


def _first_line(text: str) -> str:
    """A relay's answer for a log line and the entry's state: its first line, short."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c if c.isprintable() else " " for c in line)[:160]


def _size_of(client: aiosmtplib.SMTP) -> int:
    """The SIZE the server's EHLO announced (0: none, or no limit)."""
    try:
        return int(client.esmtp_extensions.get("size", "0") or 0)
    except ValueError:
        return 0


def relay_sender(relay: RelayConfig) -> RelayConnections:
    """Deliver through the configured relay (over kept connections)."""
    return RelayConnections(relay)
