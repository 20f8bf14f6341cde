"""The batch store: the lifecycle table, durable claims, one winner per name."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from purlgate.core.lifecycle import TRANSITIONS, BatchState, Counts
from purlgate.errors import DuplicateFileError, TransitionError
from purlgate.store import SqliteBatchStore

AT = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)


def new(store: SqliteBatchStore, name: str = "a.csv") -> int:
    return store.create(region="usa", client="acme", project=None, channel="test",
                        received_name=name, sha256=None, at=AT).id


def test_lifecycle_table_is_the_guide_s() -> None:
    """Initializing -> In Progress -> Done | Done with Errors | Failed; terminal states end."""
    assert TRANSITIONS[BatchState.INITIALIZING] == {BatchState.IN_PROGRESS, BatchState.FAILED}
    assert TRANSITIONS[BatchState.IN_PROGRESS] == {
        BatchState.DONE, BatchState.DONE_WITH_ERRORS, BatchState.FAILED,
        BatchState.INITIALIZING}  # the last only to restart after a crash
    for state in (BatchState.DONE, BatchState.DONE_WITH_ERRORS, BatchState.FAILED):
        assert TRANSITIONS[state] == frozenset()


def test_illegal_transition_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """Done cannot become Failed, nor Initializing skip to Done."""
    store = SqliteBatchStore(tmp_path / "b.sqlite3")
    bid = new(store)
    with pytest.raises(TransitionError):
        store.transition(bid, BatchState.DONE, at=AT)
    store.transition(bid, BatchState.IN_PROGRESS, at=AT)
    store.transition(bid, BatchState.DONE, at=AT, counts=Counts(3, 3, 0), outputs=("P.csv",))
    with pytest.raises(TransitionError):
        store.transition(bid, BatchState.FAILED, at=AT)
    record = store.get(bid)
    assert record.state is BatchState.DONE
    assert record.counts == Counts(3, 3, 0)
    assert record.outputs == ("P.csv",)


def test_claims_survive_a_restart(tmp_path: Path) -> None:
    """A name claimed before a restart is still refused after it."""
    path = tmp_path / "b.sqlite3"
    store = SqliteBatchStore(path)
    store.claim_name(new(store), project="spring", data_name="x.csv")
    reopened = SqliteBatchStore(path)
    with pytest.raises(DuplicateFileError):
        reopened.claim_name(new(reopened), project="spring", data_name="x.csv")


def test_simultaneous_claims_have_one_winner(tmp_path: Path) -> None:
    """Eight threads claim one name at the same moment: exactly one succeeds."""
    store = SqliteBatchStore(tmp_path / "b.sqlite3")
    ids = [new(store) for _ in range(8)]
    barrier = threading.Barrier(len(ids))
    results: list[str] = []

    def claim(bid: int) -> None:
        barrier.wait()
        try:
            SqliteBatchStore(tmp_path / "b.sqlite3").claim_name(
                bid, project="spring", data_name="same.csv")
            results.append("won")
        except DuplicateFileError:
            results.append("refused")

    threads = [threading.Thread(target=claim, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]
