"""A crash at any point: after restart each received file yields exactly one result."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from purlgate.core.lifecycle import BatchRecord, BatchState, Counts
from purlgate.core.pipeline import Submission
from purlgate.store import SqliteBatchStore
from tests.conftest import DATA, Harness, make_harness, read_csv

NAME = "ragged_20261127_101500.csv"


class Crash(BaseException):
    """Stands for the process dying: nothing in purlgate catches it."""


class CrashingStore(SqliteBatchStore):
    """Dies at one transition, after everything before it has happened."""

    def __init__(self, path: Path, crash_at: BatchState) -> None:
        super().__init__(path)
        self.crash_at = crash_at

    def transition(self, batch_id: int, target: BatchState, *, at: datetime,
                   reason: str | None = None, error_code: str | None = None,
                   counts: Counts | None = None, outputs: tuple[str, ...] = (),
                   purl_sha256: str | None = None, signer: str | None = None) -> BatchRecord:
        if target is self.crash_at:
            raise Crash
        return super().transition(batch_id, target, at=at, reason=reason,
                                  error_code=error_code, counts=counts, outputs=outputs,
                                  purl_sha256=purl_sha256, signer=signer)


def submission(intake: str = "spool-1") -> Submission:
    return Submission(path=DATA / NAME, received_name=NAME, channel="test", client_id="acme",
                      project_id="spring", intake_id=intake)


@pytest.mark.parametrize("crash_at", [BatchState.IN_PROGRESS, BatchState.DONE_WITH_ERRORS])
def test_restart_yields_exactly_one_result(harness: Harness, crash_at: BatchState) -> None:
    """Killed before the batch starts, or after the PURL file is out but before Done:
    the restarted batch finishes once, under the same batch and name, files intact."""
    crashing = CrashingStore(harness.store.path, crash_at)
    harness.processor.store = crashing
    with pytest.raises(Crash):
        harness.processor.process(submission(), harness.out)
    harness.processor.store = harness.store  # the restarted process
    outcome = harness.processor.process(submission(), harness.out)
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    assert outcome.batch.id == 1
    assert [s for s, _ in outcome.batch.history][-2:] == [BatchState.IN_PROGRESS,
                                                          BatchState.DONE_WITH_ERRORS]
    assert harness.outputs() == [f"PURL_{NAME}", f"PURL_{NAME}.flg",
                                 "PURL_ragged_20261127_101500_errors.csv"]
    assert len(read_csv(outcome.purl)) == 4  # type: ignore[arg-type]
    assert not any(p.name.startswith(".") for p in harness.out.iterdir())


def test_same_intake_after_the_end_is_not_run_again(harness: Harness) -> None:
    """A second call for an intake that already ended returns the recorded outcome."""
    first = harness.processor.process(submission(), harness.out)
    events = len(harness.events)
    again = harness.processor.process(submission(), harness.out)
    assert again.batch.id == first.batch.id
    assert again.purl == first.purl and again.errors == first.errors
    # Its end is published again, marked: a crash may have cut off the first
    # publication; those who deliver are idempotent, those who count skip it.
    assert [(e.kind, e.again) for e in harness.events[events:]] == [
        (harness.events[events - 1].kind, True)]


def test_other_intake_with_the_same_name_is_a_duplicate(harness: Harness) -> None:
    """Another received file of the same name is still the duplicate case."""
    harness.processor.process(submission("spool-1"), harness.out)
    other = harness.processor.process(submission("spool-2"), harness.out)
    assert other.state is BatchState.FAILED
    assert other.batch.error_code == "duplicate-name"


def test_restart_survives_a_new_store_object(config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The intake record is durable: a fresh process on the same data dir finds it."""
    h = make_harness(config, tmp_path)
    h.processor.store = CrashingStore(h.store.path, BatchState.DONE_WITH_ERRORS)
    with pytest.raises(Crash):
        h.processor.process(submission(), h.out)
    fresh = make_harness(config, tmp_path)
    outcome = fresh.processor.process(submission(), fresh.out)
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    assert outcome.batch.id == 1
