"""From a link's token to the row it stands for, or to nothing at all.

The token is the embedded renderer's AES block of (batch id, row ordinal). A link
answers only while its batch delivered a PURL file (Done, Done with Errors) and is
inside its project's retention. Unknown, malformed, forged and expired tokens all come
out as ``None`` after the same steps (decode, one in-memory index look-up), so a caller
can answer them identically and in the same time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from purlgate.core.lifecycle import BatchSummary, RegionStore
from purlgate.renderers.embedded import decode

TOKEN = re.compile(r"^[0-9a-f]{32}$")
REFRESH_SECONDS = 2.0  # at most one store query per this long for unknown batch ids
# Each refresh looks back this far past the newest batch it saw: a batch another
# instance (or thread) finished a moment before that one may be committed after it.
OVERLAP = timedelta(minutes=10)


@dataclass(frozen=True)
class LinkedBatch:
    id: int
    client: str
    project: str
    expires_at: datetime


@dataclass(frozen=True)
class Link:
    batch: LinkedBatch
    ordinal: int


class BatchIndex:
    """The batches whose links answer, in memory; filled from the store and events."""

    def __init__(self, store: RegionStore, retention: Callable[[str, str], timedelta],
                 key: bytes, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._retention = retention
        self._key = key
        self._clock = clock
        self._batches: dict[int, LinkedBatch] = {}
        self._lock = threading.Lock()
        self._seen_until: datetime | None = None
        self._next_refresh = 0.0
        self.refresh(force=True)

    def _add(self, summary: BatchSummary) -> None:
        expires = summary.created_at + self._retention(summary.client, summary.project)
        with self._lock:
            self._batches[summary.id] = LinkedBatch(summary.id, summary.client,
                                                    summary.project, expires)

    def add(self, summary: BatchSummary) -> None:
        """A batch just delivered its PURL file (called from the batch's thread)."""
        self._add(summary)

    def refresh(self, *, force: bool = False) -> None:
        """Pick up batches finished by another process (another instance, ``purlgate
        process``)."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        since = self._seen_until - OVERLAP if self._seen_until is not None else None
        for summary in self._store.finished_since(since):
            self._add(summary)
            if self._seen_until is None or summary.updated_at > self._seen_until:
                self._seen_until = summary.updated_at

    def batches(self) -> list[LinkedBatch]:
        with self._lock:
            return list(self._batches.values())

    def forget(self, batch_id: int) -> None:
        with self._lock:
            self._batches.pop(batch_id, None)

    def resolve(self, token: str) -> Link | None:
        decoded = decode(self._key, token) if TOKEN.match(token) else None
        batch_id, ordinal = decoded if decoded is not None else (-1, -1)
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None and decoded is not None:
            self.refresh()
            with self._lock:
                batch = self._batches.get(batch_id)
        if batch is None or batch.expires_at <= self._clock():
            return None
        return Link(batch, ordinal)
