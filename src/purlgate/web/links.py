"""From a link's token to the row it stands for, or to nothing at all.

The token is the embedded renderer's AES block of (batch id, row ordinal). A link
answers only while its batch delivered a PURL file (Done, Done with Errors) and is
inside its project's retention. Unknown, malformed, forged and expired tokens all come
out as ``None`` after the same steps (decode, one in-memory index look-up), so a caller
can answer them identically and in the same time; a token that decodes to a batch not
in memory (only we can make one: a link of ours) sends the caller to the store once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from purlgate.core.lifecycle import BatchState, BatchSummary, RegionStore
from purlgate.renderers.embedded import decode

TOKEN = re.compile(r"^[0-9a-f]{32}$")
ABSENT_SECONDS = 2.0  # a batch found not to serve links is asked about again after this
MAX_ABSENT = 10_000  # such answers remembered at most (then forgotten at once)
SERVED = frozenset({BatchState.DONE, BatchState.DONE_WITH_ERRORS})
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
    """The batches whose links answer, in memory; filled from the store and events.

    A token of a batch not in memory (one another instance or process finished) sends
    the caller to ``learn`` it from the store, off the event loop; a batch found not
    to serve links is not asked about again for ``ABSENT_SECONDS``. ``refresh`` reads
    every batch finished since the last one (the retention sweep starts with it: what
    it does not know it would take for never served)."""

    def __init__(self, store: RegionStore, retention: Callable[[str, str], timedelta],
                 key: bytes, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._retention = retention
        self._key = key
        self._clock = clock
        self._batches: dict[int, LinkedBatch] = {}
        self._absent: dict[int, float] = {}  # batch id -> not asked again until (monotonic)
        self._lock = threading.Lock()
        self._seen_until: datetime | None = None
        self.refresh()

    def _add(self, summary: BatchSummary) -> None:
        expires = summary.created_at + self._retention(summary.client, summary.project)
        with self._lock:
            self._batches[summary.id] = LinkedBatch(summary.id, summary.client,
                                                    summary.project, expires)
            self._absent.pop(summary.id, None)

    def add(self, summary: BatchSummary) -> None:
        """A batch just delivered its PURL file (called from the batch's thread)."""
        self._add(summary)

    def refresh(self) -> None:
        """Pick up every batch finished since the last refresh (a store query)."""
        since = self._seen_until - OVERLAP if self._seen_until is not None else None
        for summary in self._store.finished_since(since):
            self._add(summary)
            if self._seen_until is None or summary.updated_at > self._seen_until:
                self._seen_until = summary.updated_at

    def learn(self, batch_id: int) -> None:
        """Look one batch up in the store (a store query: off the event loop)."""
        record = self._store.find(batch_id)
        if record is not None and record.state in SERVED:
            self._add(BatchSummary(record.id, record.client, record.project or "",
                                   record.created_at, record.updated_at))
            return
        with self._lock:  # none, or not done yet: asked again a little later
            if len(self._absent) >= MAX_ABSENT:
                self._absent.clear()
            self._absent[batch_id] = time.monotonic() + ABSENT_SECONDS

    def batches(self) -> list[LinkedBatch]:
        with self._lock:
            return list(self._batches.values())

    def forget(self, batch_id: int) -> None:
        with self._lock:
            self._batches.pop(batch_id, None)

    def lookup(self, token: str) -> tuple[Link | None, int | None]:
        """The link of ``token`` from memory, or the id of a batch worth looking up in
        the store first (``learn``), then looking again."""
        decoded = decode(self._key, token) if TOKEN.match(token) else None
        batch_id, ordinal = decoded if decoded is not None else (-1, -1)
        with self._lock:
            batch = self._batches.get(batch_id)
            absent_until = self._absent.get(batch_id, 0.0)
        if batch is None:
            unknown = decoded is not None and time.monotonic() >= absent_until
            return None, batch_id if unknown else None
        if batch.expires_at <= self._clock():
            return None, None
        return Link(batch, ordinal), None
