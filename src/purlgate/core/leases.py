"""Leases: which instance works on a spool entry, an upload, a name or a reply right now.

An instance claims a piece of work before it starts on it and lets go when it is done.
A claim is a lease, not a lock held forever: the instance renews all of its leases
together (``renew``, every third of ``seconds``) while it lives, and the leases of an
instance that died (kill -9, power off) run out, after which another instance's claim
succeeds and it takes the work over. Every step the work is made of resumes
idempotently, so the only cost of a takeover is the repeated part of that step.

``LocalLeases`` is the one-instance implementation (the embedded SQLite backend: one
machine, one process that claims); ``purlgate.postgres.PgLeases`` is the shared one.
Both pass the same contract tests (tests/test_backends.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SECONDS = 30.0


@dataclass(frozen=True)
class Lease:
    kind: str  # "mail", "sftp", "outbox", "name"
    key: str
    owner: str  # the instance's name
    expires_in: float  # seconds (negative: ran out, free for the taking)


@dataclass(frozen=True)
class InstanceSeen:
    """An instance as the others see it: when it last renewed its leases."""

    name: str
    started_at: float  # epoch seconds
    seen_ago: float  # seconds since its last renewal
    leases: int


class Leases(Protocol):
    instance: str
    seconds: float

    def join(self) -> None:
        """This instance starts serving: the others see it (``instances``)."""
        ...

    def leave(self) -> None:
        """This instance stops cleanly: its leases go at once, and so does it."""
        ...

    def claim(self, kind: str, key: str) -> bool:
        """Take the lease on (kind, key): True if it was free, ran out, or is ours."""
        ...

    def release(self, kind: str, key: str) -> None:
        """Let go of our lease (another instance's is left alone)."""
        ...

    def renew(self) -> int:
        """Extend every lease of this instance; the number held."""
        ...

    def holder(self, kind: str, key: str) -> str | None:
        """The instance holding a live lease on (kind, key), if any."""
        ...

    def held(self) -> list[Lease]:
        """Every lease, live or run out but not yet taken over (the ops view)."""
        ...

    def instances(self) -> list[InstanceSeen]: ...


class LocalLeases:
    """Leases in this process's memory: the one instance of an embedded region."""

    def __init__(self, instance: str, seconds: float = DEFAULT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.instance = instance
        self.seconds = seconds
        self._clock = clock
        self._started = time.time()
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], float] = {}  # (kind, key) -> expires at

    def join(self) -> None:
        """Nothing to tell: there are no other instances."""

    def leave(self) -> None:
        with self._lock:
            self._leases.clear()

    def claim(self, kind: str, key: str) -> bool:
        with self._lock:
            self._leases[kind, key] = self._clock() + self.seconds
        return True

    def release(self, kind: str, key: str) -> None:
        with self._lock:
            self._leases.pop((kind, key), None)

    def renew(self) -> int:
        with self._lock:
            until = self._clock() + self.seconds
            for lease in self._leases:
                self._leases[lease] = until
            return len(self._leases)

    def holder(self, kind: str, key: str) -> str | None:
        with self._lock:
            until = self._leases.get((kind, key))
        return self.instance if until is not None and until > self._clock() else None

    def held(self) -> list[Lease]:
        now = self._clock()
        with self._lock:
            return [Lease(kind, key, self.instance, until - now)
                    for (kind, key), until in sorted(self._leases.items())]

    def instances(self) -> list[InstanceSeen]:
        with self._lock:
            count = len(self._leases)
        return [InstanceSeen(self.instance, self._started, 0.0, count)]
