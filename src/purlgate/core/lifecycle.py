"""The batch lifecycle as data, and the records and events that carry it.

This file holds only the states clients know, the table of allowed transitions, the
record a store keeps per batch, the events published on each transition, and the store
protocol. No I/O.

    Initializing -> In Progress -> Done | Done with Errors | Failed
    Initializing -> Failed
    In Progress -> Initializing        only to restart a batch a crash interrupted
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from purlgate.errors import TransitionError


class BatchState(StrEnum):
    INITIALIZING = "Initializing"
    IN_PROGRESS = "In Progress"
    DONE = "Done"
    DONE_WITH_ERRORS = "Done with Errors"
    FAILED = "Failed"


TRANSITIONS: Mapping[BatchState, frozenset[BatchState]] = {
    BatchState.INITIALIZING: frozenset({BatchState.IN_PROGRESS, BatchState.FAILED}),
    BatchState.IN_PROGRESS: frozenset(
        {BatchState.DONE, BatchState.DONE_WITH_ERRORS, BatchState.FAILED,
         BatchState.INITIALIZING}
    ),
    BatchState.DONE: frozenset(),
    BatchState.DONE_WITH_ERRORS: frozenset(),
    BatchState.FAILED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class EventKind(StrEnum):
    RECEIVED = "batch received"  # a new batch was recorded (Initializing)
    LOADED = "batch loaded"  # the file was read and rows are being processed
    SUMMARY = "batch summary"  # Done or Done with Errors
    FAILED = "batch failed"
    VALIDATED = "validation finished"  # a validate-only check ended (its record's kind)


EVENT_OF_STATE: Mapping[BatchState, EventKind] = {
    BatchState.IN_PROGRESS: EventKind.LOADED,
    BatchState.DONE: EventKind.SUMMARY,
    BatchState.DONE_WITH_ERRORS: EventKind.SUMMARY,
    BatchState.FAILED: EventKind.FAILED,
}


def check_transition(current: BatchState, target: BatchState) -> None:
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"batch cannot go from {current} to {target}")


@dataclass(frozen=True)
class Counts:
    rows_total: int = 0  # data rows read (good and bad)
    rows_ok: int = 0  # rows in the PURL file
    rows_error: int = 0  # rows reported in the error file


@dataclass(frozen=True)
class BatchRecord:
    id: int
    region: str
    client: str
    project: str | None
    channel: str
    received_name: str
    data_name: str | None
    sha256: str | None
    state: BatchState
    reason: str | None
    error_code: str | None
    counts: Counts
    outputs: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    history: tuple[tuple[BatchState, datetime], ...] = field(default=())
    intake_id: str | None = None  # the channel's id of the received file (its spool id)
    instance: str | None = None  # the instance that last moved it
    kind: str = "batch"  # or "validation": a dry run (no name claimed, nothing made)
    purl_sha256: str | None = None  # of the PURL file as delivered (encrypted: as such)
    # The audit trail: where it came from (channel's words: an address and a host),
    # who the mail checks say sent it, and the PGP key that signed it.
    source: str | None = None
    sender_auth: str | None = None
    signer: str | None = None


@dataclass(frozen=True)
class BatchSummary:
    """What the web side needs of a batch that delivered links."""

    id: int
    client: str
    project: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class BatchEvent:
    kind: EventKind
    batch: BatchRecord
    # Published again for a batch a crash interrupted (its first publication may have
    # been cut off): subscribers that deliver are idempotent and take it, those that
    # count skip it.
    again: bool = False


class BatchStore(Protocol):
    """Durable batch state. ``claim_name`` is the duplicate-name guard: atomic, and held
    while the batch runs or after it delivered; a batch that fails releases it in the
    transaction that records the failure."""

    def create(
        self, *, region: str, client: str, project: str | None, channel: str,
        received_name: str, sha256: str | None, at: datetime, intake_id: str | None = None,
        kind: str = "batch", source: str | None = None, sender_auth: str | None = None,
    ) -> BatchRecord: ...

    def find_by_intake(self, intake_id: str) -> BatchRecord | None: ...

    def claim_name(self, batch_id: int, *, project: str, data_name: str) -> None: ...

    def set_sha256(self, batch_id: int, sha256: str) -> None: ...

    def transition(
        self, batch_id: int, target: BatchState, *, at: datetime, reason: str | None = None,
        error_code: str | None = None, counts: Counts | None = None,
        outputs: tuple[str, ...] = (), purl_sha256: str | None = None,
        signer: str | None = None,
    ) -> BatchRecord: ...

    def get(self, batch_id: int) -> BatchRecord: ...

    def find_by_name(self, client: str, project: str, data_name: str) -> BatchRecord | None: ...

    def held_since(self, client: str, project: str, name: str) -> datetime | None:
        """When the batch holding ``name`` (as sent or as its data file) arrived."""
        ...


class RegionStore(BatchStore, Protocol):
    """The batch store as the channels, the web side and the commands see it too
    (``store.SqliteBatchStore``, ``postgres.PgBatchStore``)."""

    @property
    def instance(self) -> str | None: ...

    def find(self, batch_id: int) -> BatchRecord | None: ...

    def finished_since(self, since: datetime | None) -> list[BatchSummary]: ...

    def search(self, *, client: str | None = None, project: str | None = None,
               status: str | None = None, limit: int = 200) -> list[BatchRecord]: ...

    def recent(self, limit: int = 50) -> list[BatchRecord]: ...
