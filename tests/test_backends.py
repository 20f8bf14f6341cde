"""One contract for both backends: the embedded SQLite one and the shared PostgreSQL one.

Every test of the first part runs against each (``backend`` is parametrised), on a real
SQLite file and a real PostgreSQL server (tests/pg_helpers.py): the batch store with
its duplicate-name guard, the mail and render ledgers, and the leases as one instance
sees them. The second part is what only a shared database has: leases between
instances, migrations raced by two instances, and a database that goes away and comes
back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from purlgate.channels.mail_worker import MailLedger
from purlgate.core.leases import Leases, LocalLeases
from purlgate.core.lifecycle import BatchState, Counts, RegionStore
from purlgate.core.render import RenderLedgerPort, RowState
from purlgate.errors import (
    DatabaseUnavailableError,
    DuplicateFileError,
    StorageError,
    TransitionError,
)
from purlgate.postgres import (
    MIGRATIONS,
    PgBatchStore,
    PgDatabase,
    PgLeases,
    PgMailLedger,
    PgRenderLedger,
)
from purlgate.renderers.storyboard import RenderLedger
from purlgate.store import SqliteBatchStore
from tests.pg_helpers import PgCluster
from tests.waiting import eventually_blocking

AT = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)


@dataclass
class Backend:
    """Opens the parts of one backend, all on the same underlying database."""

    name: str
    store: Callable[..., RegionStore]  # (instance=None) -> a new store object
    mail_ledger: Callable[[], Any]
    render_ledger: Callable[[], RenderLedgerPort]
    leases: Callable[[str], Leases]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(
            "sqlite",
            lambda instance=None: SqliteBatchStore(tmp_path / "b.sqlite3", instance=instance),
            lambda: MailLedger(tmp_path / "mail.sqlite3"),
            lambda: RenderLedger(tmp_path / "render.sqlite3"),
            LocalLeases)
        return
    url = request.getfixturevalue("pg_url")
    opened: list[PgDatabase] = []

    def db(instance: str = "one") -> PgDatabase:
        opened.append(PgDatabase(url, region="usa", instance=instance))
        return opened[-1]

    yield Backend("postgres", lambda instance=None: PgBatchStore(db(instance or "one")),
                  lambda: PgMailLedger(db()), lambda: PgRenderLedger(db()),
                  lambda instance: PgLeases(db(instance), 30))
    for each in opened:
        each.close()


def new(store: RegionStore, name: str = "a.csv", intake_id: str | None = None,
        at: datetime = AT) -> int:
    return store.create(region="usa", client="acme", project=None, channel="test",
                        received_name=name, sha256=None, at=at, intake_id=intake_id).id


# -- the batch store ----------------------------------------------------------------------


def test_illegal_transition_is_refused_and_changes_nothing(backend: Backend) -> None:
    """Done cannot become Failed, nor Initializing skip to Done; the history is in order."""
    store = backend.store()
    bid = new(store)
    with pytest.raises(TransitionError):
        store.transition(bid, BatchState.DONE, at=AT)
    store.transition(bid, BatchState.IN_PROGRESS, at=AT + timedelta(seconds=1))
    store.transition(bid, BatchState.DONE, at=AT + timedelta(seconds=2),
                     counts=Counts(3, 3, 0), outputs=("P.csv",))
    with pytest.raises(TransitionError):
        store.transition(bid, BatchState.FAILED, at=AT)
    record = store.get(bid)
    assert record.state is BatchState.DONE
    assert record.counts == Counts(3, 3, 0)
    assert record.outputs == ("P.csv",)
    assert [s for s, _ in record.history] == [
        BatchState.INITIALIZING, BatchState.IN_PROGRESS, BatchState.DONE]
    assert record.updated_at == AT + timedelta(seconds=2)
    with pytest.raises(StorageError, match="no batch"):
        store.get(bid + 1000)


def test_a_claim_holds_across_store_objects(backend: Backend) -> None:
    """A name claimed through one store object (a restart, another instance) is refused
    through another, with the time it was first received."""
    first = backend.store()
    first.claim_name(new(first), project="spring", data_name="x.csv")
    other = backend.store()
    with pytest.raises(DuplicateFileError, match=r"'x.csv' was already received for project "
                                                 r"spring at 2026-11-27 10:15:00 UTC"):
        other.claim_name(new(other), project="spring", data_name="x.csv")


def test_simultaneous_claims_have_one_winner(backend: Backend) -> None:
    """Eight claimers (each its own store object: its own connection) race for one name:
    exactly one wins."""
    setup = backend.store()
    ids = [new(setup) for _ in range(8)]
    stores = [backend.store() for _ in ids]
    barrier = threading.Barrier(len(ids))
    results: list[str] = []

    def claim(store: RegionStore, bid: int) -> None:
        barrier.wait()
        try:
            store.claim_name(bid, project="spring", data_name="same.csv")
            results.append("won")
        except DuplicateFileError:
            results.append("refused")

    threads = [threading.Thread(target=claim, args=pair)
               for pair in zip(stores, ids, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]


def test_a_failed_batch_lets_its_name_go(backend: Backend) -> None:
    store = backend.store()
    bid = new(store)
    store.claim_name(bid, project="spring", data_name="x.csv")
    assert store.held_since("acme", "spring", "x.csv") == AT
    store.transition(bid, BatchState.FAILED, at=AT, reason="bad", error_code="bad-file")
    assert store.find_by_name("acme", "spring", "x.csv") is None
    assert store.held_since("acme", "spring", "x.csv") is None
    again = new(store)
    store.claim_name(again, project="spring", data_name="x.csv")
    held = store.find_by_name("acme", "spring", "x.csv")
    assert held is not None
    assert held.id == again


def test_lookups(backend: Backend) -> None:
    """By spool id, by name as sent, the finished batches since a time, the search."""
    store = backend.store("box-1")
    one = new(store, "one.zip", intake_id="spool-1")
    two = new(store, "two.zip", intake_id="spool-2", at=AT + timedelta(hours=1))
    store.claim_name(two, project="spring", data_name="two.csv")
    for bid in (one, two):
        store.transition(bid, BatchState.IN_PROGRESS, at=AT)
    store.transition(two, BatchState.DONE, at=AT + timedelta(hours=2))
    found = store.find_by_intake("spool-1")
    assert found is not None
    assert (found.id, found.instance) == (one, "box-1")
    assert store.find_by_intake("spool-3") is None
    # The name a batch holds answers as sent (the ZIP) and as its data file.
    assert store.held_since("acme", "spring", "two.zip") == AT + timedelta(hours=1)
    assert store.held_since("acme", "spring", "two.csv") == AT + timedelta(hours=1)
    assert [s.id for s in store.finished_since(None)] == [two]
    assert [s.id for s in store.finished_since(AT + timedelta(hours=3))] == []
    assert [r.id for r in store.search(client="acme")] == [two, one]
    assert [r.id for r in store.search(status="Done")] == [two]
    assert [r.id for r in store.search(project="spring")] == [two]
    assert [r.id for r in store.recent(1)] == [two]
    with pytest.raises(Exception):  # noqa: B017 - each engine's own integrity error
        new(store, "three.zip", intake_id="spool-1")


# -- the ledgers and leases ---------------------------------------------------------------


def test_the_mail_ledger_has_one_owner_per_message(backend: Backend) -> None:
    """A message delivered twice (an MX retry, SMTP and IMAP) belongs to the first spool
    entry that asked, whichever ledger object the second asks through."""
    first, second = backend.mail_ledger(), backend.mail_ledger()
    assert first.claim("<m1@x>|abc", "spool-1") == "spool-1"
    assert second.claim("<m1@x>|abc", "spool-2") == "spool-1"
    assert second.claim("<m2@x>|abc", "spool-2") == "spool-2"


def test_the_render_ledger_keeps_each_row(backend: Backend) -> None:
    ledger = backend.render_ledger()
    ledger.record(7, 0, RowState("requested", "https://api/s/0", None, None, None))
    ledger.record(7, 1, RowState("failed", None, None, None, "refused"))
    ledger.record(7, 0, RowState("done", "https://api/s/0", "https://t/0", "https://l/0",
                                 None))
    again = backend.render_ledger()  # another instance's view
    assert again.load(7, 0, 10) == {
        0: RowState("done", "https://api/s/0", "https://t/0", "https://l/0", None),
        1: RowState("failed", None, None, None, "refused")}
    assert again.load(7, 1, 1) == {1: RowState("failed", None, None, None, "refused")}
    again.forget(7)
    assert ledger.load(7, 0, 10) == {}


def test_leases_of_one_instance(backend: Backend) -> None:
    leases = backend.leases("box-1")
    leases.join()
    assert leases.claim("mail", "e1")
    assert leases.claim("mail", "e1")  # ours already: claiming again is fine
    assert leases.claim("outbox", "r1")
    assert leases.holder("mail", "e1") == "box-1"
    assert leases.renew() == 2
    assert [(lease.kind, lease.key, lease.owner) for lease in leases.held()] == [
        ("mail", "e1", "box-1"), ("outbox", "r1", "box-1")]
    assert all(0 < lease.expires_in <= leases.seconds for lease in leases.held())
    leases.release("mail", "e1")
    assert leases.holder("mail", "e1") is None
    assert [(i.name, i.leases) for i in leases.instances()] == [("box-1", 1)]
    leases.leave()  # a clean stop
    assert leases.held() == []


# -- what only a shared database has ------------------------------------------------------


def test_a_lease_is_one_instance_s_until_it_runs_out(pg_url: str) -> None:
    """Instance b cannot take what a holds while a renews; once a stops renewing (it
    died) and its lease runs out, b takes it over, and a's late release leaves b's lease
    alone. Time passes on the database's clock, which decides: the lease is aged there
    rather than waited for."""
    a = PgLeases(PgDatabase(pg_url, region="usa", instance="a"), seconds=30)
    b = PgLeases(PgDatabase(pg_url, region="usa", instance="b"), seconds=30)
    a.join()
    b.join()

    def age(seconds: float) -> None:  # the lease's time passes by this much
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE leases SET expires_at = expires_at - make_interval("
                         "secs => %s)", (seconds,))

    assert a.claim("mail", "e1")
    assert not b.claim("mail", "e1")
    assert b.holder("mail", "e1") == "a"
    age(29)  # a second left: a renews, and has the whole lease time again
    assert a.renew() == 1
    assert a.held()[0].expires_in > 29
    age(29)
    assert not b.claim("mail", "e1"), "renewed: still a's"
    age(2)  # a died: no renewal, the lease ran out
    assert b.holder("mail", "e1") is None
    assert b.claim("mail", "e1")
    assert b.holder("mail", "e1") == "b"
    a.release("mail", "e1")  # too late: no longer a's to release
    assert b.holder("mail", "e1") == "b"
    assert a.renew() == 0
    assert {i.name: i.leases for i in b.instances()} == {"a": 0, "b": 1}


def test_regions_sharing_a_database_keep_apart(pg_url: str) -> None:
    """Two regions in one database: their names, ledgers and leases never meet."""
    usa = PgBatchStore(PgDatabase(pg_url, region="usa", instance="a"))
    emea = PgBatchStore(PgDatabase(pg_url, region="emea", instance="a"))
    usa.claim_name(new(usa), project="spring", data_name="x.csv")
    bid = emea.create(region="emea", client="acme", project=None, channel="test",
                      received_name="x.csv", sha256=None, at=AT).id
    emea.claim_name(bid, project="spring", data_name="x.csv")
    assert [r.region for r in emea.search()] == ["emea"]
    assert PgMailLedger(usa.db).claim("k", "1") == "1"
    assert PgMailLedger(emea.db).claim("k", "2") == "2"
    assert PgLeases(usa.db, 30).claim("mail", "e") and PgLeases(emea.db, 30).claim("mail", "e")


def test_two_instances_starting_at_once_migrate_once(pg_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Eight instances open an empty database at the same moment: the schema is made
    once (one log line per migration), and every one of them can work."""
    barrier = threading.Barrier(8)
    opened: list[PgDatabase] = []
    errors: list[BaseException] = []

    def start(n: int) -> None:
        barrier.wait()
        try:
            opened.append(PgDatabase(pg_url, region="usa", instance=f"i{n}"))
        except BaseException as exc:
            errors.append(exc)

    with caplog.at_level("INFO", logger="purlgate.database"):
        threads = [threading.Thread(target=start, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert [r.getMessage() for r in caplog.records] == [
        f"database schema migrated to version {n}" for n in range(1, len(MIGRATIONS) + 1)]
    for db in opened:
        PgBatchStore(db).recent()
        db.close()


def test_a_newer_schema_is_refused_by_name(pg_url: str) -> None:
    PgDatabase(pg_url, region="usa", instance="a").close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE purlgate_schema SET version = 99")
    with pytest.raises(StorageError, match=r"schema 99, newer than this release"):
        PgDatabase(pg_url, region="usa", instance="a")


def test_wrong_password_and_no_server_are_named(pg_cluster: PgCluster) -> None:
    name = pg_cluster.new_database()
    wrong = pg_cluster.url(name).replace("pg-test-secret", "wrong")
    with pytest.raises(DatabaseUnavailableError,
                       match="refused: password authentication failed"):
        PgDatabase(wrong, region="usa", instance="a", connect_timeout=2)
    nobody = f"postgresql://u:p@127.0.0.1:{_closed_port()}/x"
    with pytest.raises(DatabaseUnavailableError, match="unreachable"):
        PgDatabase(nobody, region="usa", instance="a", connect_timeout=2)


def _answers(store: PgBatchStore, bid: int) -> bool:
    try:
        return store.get(bid).id == bid
    except DatabaseUnavailableError:
        return False


def _closed_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_database_that_goes_away_and_comes_back(pg_cluster: PgCluster) -> None:
    """While the server is down every call is a DatabaseUnavailableError (a storage
    fault: work waits); once it is back, the same objects work again, no restart."""
    db = PgDatabase(pg_cluster.url(pg_cluster.new_database()), region="usa",
                    instance="a", connect_timeout=2)
    store = PgBatchStore(db)
    bid = new(store)
    pg_cluster.stop()
    try:
        with pytest.raises(DatabaseUnavailableError):
            store.get(bid)
        with pytest.raises(DatabaseUnavailableError):
            db.ping()
    finally:
        pg_cluster.start()
    eventually_blocking(lambda: _answers(store, bid), "the store answers again", timeout=15)
    db.close()


def test_the_mail_ledger_under_a_race_has_one_owner(backend: Backend) -> None:
    """Eight deliveries of one message claim it at the same moment (an MX retry to
    every instance): all of them learn the same owner."""
    ledgers = [backend.mail_ledger() for _ in range(8)]
    barrier = threading.Barrier(len(ledgers))
    owners: list[str] = []

    def claim(n: int) -> None:
        barrier.wait()
        owners.append(ledgers[n].claim("<race@x>|abc", f"spool-{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(ledgers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(owners) == 8 and len(set(owners)) == 1, owners


def test_a_validation_is_listed_but_holds_no_name_and_serves_no_link(
        backend: Backend) -> None:
    """A validation's record (kind "validation") is in the batch view, but never holds
    its file name nor counts among the batches whose links answer."""
    store = backend.store()
    record = store.create(region="usa", client="acme", project="spring", channel="test",
                          received_name="x.csv", sha256=None, at=AT, kind="validation")
    store.transition(record.id, BatchState.IN_PROGRESS, at=AT)
    store.transition(record.id, BatchState.DONE, at=AT, counts=Counts(5, 5, 0))
    assert store.held_since("acme", "spring", "x.csv") is None
    assert store.finished_since(None) == []
    assert [(r.kind, r.state) for r in store.search()] == [("validation", BatchState.DONE)]
    real = new(store, "x.csv")
    store.claim_name(real, project="spring", data_name="x.csv")
    assert store.held_since("acme", "spring", "x.csv") == AT
