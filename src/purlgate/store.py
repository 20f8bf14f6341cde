"""The embedded batch store: SQLite (WAL) in the region's data directory.

The unique index on (client, project, data_name) of batches that have not failed is
the duplicate-name guard: two files of the same name racing from two channels or two
sessions cannot both claim it, a claim survives restarts, and a batch that fails lets
its name go in the same transaction that records the failure (the client sends the
corrected file under the same name). Each thread keeps its own connection (see
``_connect``), so the store is safe to use from worker threads.

The schema is versioned (``PRAGMA user_version``): ``MIGRATIONS`` are applied in order
at open, each in its own transaction, so a data directory of an earlier release is
upgraded in place with every batch, claim and transition kept.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from purlgate.core.lifecycle import (
    TERMINAL,
    BatchRecord,
    BatchState,
    BatchSummary,
    Counts,
    check_transition,
)
from purlgate.errors import DuplicateFileError, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    region TEXT NOT NULL,
    client TEXT NOT NULL,
    project TEXT,
    channel TEXT NOT NULL,
    received_name TEXT NOT NULL,
    data_name TEXT,
    sha256 TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    error_code TEXT,
    rows_total INTEGER NOT NULL DEFAULT 0,
    rows_ok INTEGER NOT NULL DEFAULT 0,
    rows_error INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    intake_id TEXT UNIQUE
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_claimed_name
    ON batches (client, project, data_name) WHERE data_name IS NOT NULL;
CREATE TABLE IF NOT EXISTS transitions (
    batch_id INTEGER NOT NULL REFERENCES batches(id),
    state TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_batch ON transitions (batch_id);
"""


# Version n of the schema is MIGRATIONS[n - 1] applied to version n - 1.
MIGRATIONS: tuple[str, ...] = (
    SCHEMA,  # 1: the first release (its tables may already exist: IF NOT EXISTS)
    # 2: a failed batch no longer holds its name
    """
    DROP INDEX IF EXISTS batches_claimed_name;
    CREATE UNIQUE INDEX batches_claimed_name ON batches (client, project, data_name)
        WHERE data_name IS NOT NULL AND state != 'Failed';
    """,
    # 3: the instance that last moved a batch (the batch view; see postgres.py)
    "ALTER TABLE batches ADD COLUMN instance TEXT;",
    # 4: validations (dry runs) are listed beside batches, never counted as one
    "ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'batch';",
    # 5: the SHA-256 of the PURL file as delivered (the audit trail, the webhooks)
    "ALTER TABLE batches ADD COLUMN purl_sha256 TEXT;",
    # 6: the rest of the audit trail: source, sender verdicts, PGP signer
    """
    ALTER TABLE batches ADD COLUMN source TEXT;
    ALTER TABLE batches ADD COLUMN sender_auth TEXT;
    ALTER TABLE batches ADD COLUMN signer TEXT;
    """,
)


def _ts(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


class SqliteBatchStore:
    def __init__(self, path: Path, *, instance: str | None = None) -> None:
        self.path = path
        self.instance = instance
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StorageError(f"the batch store is of schema {version}, newer than this "
                               f"release ({len(MIGRATIONS)}): run the newer release")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; BEGIN makes the migration and its version one.
            db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};"
                             "\nCOMMIT;")

    @contextmanager
    def _connect(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """This thread's connection, kept open: opening one reads the schema, and closing
        the last one checkpoints the WAL, which cost more than the work itself. A
        transaction an error interrupted is rolled back before the error goes on.

        ``durable=False``: the commit is not fsynced (WAL, synchronous=NORMAL). It still
        survives a crash of the process, and the next durable commit makes it survive a
        power cut too (the WAL is written in order). Used for the steps a power cut may
        lose because the spool entry is then simply handled again: a batch's creation
        before its name claim, its intermediate states, its sha256. The claim and the
        end states are durable."""
        try:
            db: sqlite3.Connection | None = getattr(self._local, "db", None)
            if db is None:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                self._local.db = db
        except sqlite3.Error as exc:
            raise StorageError(f"batch store {self.path.name}: {exc}") from exc
        if not durable:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield db
        except BaseException as exc:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                raise StorageError(f"batch store {self.path.name}: {exc}") from exc
            raise
        finally:
            if not durable:
                with suppress(sqlite3.Error):
                    db.execute("PRAGMA synchronous=FULL")

    def create(
        self, *, region: str, client: str, project: str | None, channel: str,
        received_name: str, sha256: str | None, at: datetime, intake_id: str | None = None,
        kind: str = "batch", source: str | None = None, sender_auth: str | None = None,
    ) -> BatchRecord:
        with self._connect(durable=False) as db:  # durable with the claim or the end
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "INSERT INTO batches (region, client, project, channel, received_name, sha256,"
                " state, created_at, updated_at, intake_id, instance, kind, source,"
                " sender_auth) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (region, client, project, channel, received_name, sha256,
                 BatchState.INITIALIZING.value, _ts(at), _ts(at), intake_id, self.instance,
                 kind, source, sender_auth),
            )
            batch_id = int(cur.lastrowid or 0)
            db.execute(
                "INSERT INTO transitions (batch_id, state, at) VALUES (?,?,?)",
                (batch_id, BatchState.INITIALIZING.value, _ts(at)),
            )
            db.execute("COMMIT")
        return self.get(batch_id)

    def claim_name(self, batch_id: int, *, project: str, data_name: str) -> None:
        try:
            with self._connect() as db:
                db.execute(
                    "UPDATE batches SET project = ?, data_name = ? WHERE id = ?",
                    (project, data_name, batch_id),
                )
        except sqlite3.IntegrityError as exc:
            client = self.get(batch_id).client
            first = self.find_by_name(client, project, data_name)
            when = first.created_at.strftime("%Y-%m-%d %H:%M:%S UTC") if first else "earlier"
            raise DuplicateFileError(
                f"a file named {data_name!r} was already received for project {project} "
                f"at {when}; it was not processed again and nothing was overwritten. "
                "Send new data under a new name (with a new time of day)"
            ) from exc

    def set_sha256(self, batch_id: int, sha256: str) -> None:
        with self._connect(durable=False) as db:
            db.execute("UPDATE batches SET sha256 = ? WHERE id = ?", (sha256, batch_id))

    def transition(
        self, batch_id: int, target: BatchState, *, at: datetime, reason: str | None = None,
        error_code: str | None = None, counts: Counts | None = None,
        outputs: tuple[str, ...] = (), purl_sha256: str | None = None,
        signer: str | None = None,
    ) -> BatchRecord:
        with self._connect(durable=target in TERMINAL) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise StorageError(f"no batch {batch_id}")
            try:
                check_transition(BatchState(row["state"]), target)
            except Exception:
                db.execute("ROLLBACK")
                raise
            c = counts or Counts()
            db.execute(
                "UPDATE batches SET state = ?, reason = COALESCE(?, reason),"
                " error_code = COALESCE(?, error_code), rows_total = ?, rows_ok = ?,"
                " rows_error = ?, outputs = ?, updated_at = ?,"
                " instance = COALESCE(?, instance), purl_sha256 = COALESCE(?, purl_sha256),"
                " signer = COALESCE(?, signer) WHERE id = ?",
                (target.value, reason, error_code, c.rows_total, c.rows_ok, c.rows_error,
                 json.dumps(list(outputs)), _ts(at), self.instance, purl_sha256, signer,
                 batch_id),
            )
            db.execute(
                "INSERT INTO transitions (batch_id, state, at) VALUES (?,?,?)",
                (batch_id, target.value, _ts(at)),
            )
            db.execute("COMMIT")
        return self.get(batch_id)

    def _record(self, db: sqlite3.Connection, row: sqlite3.Row) -> BatchRecord:
        history = tuple(
            (BatchState(h["state"]), datetime.fromisoformat(h["at"]))
            for h in db.execute(
                "SELECT state, at FROM transitions WHERE batch_id = ? ORDER BY rowid",
                (row["id"],),
            )
        )
        return BatchRecord(
            id=row["id"], region=row["region"], client=row["client"], project=row["project"],
            channel=row["channel"], received_name=row["received_name"],
            data_name=row["data_name"], sha256=row["sha256"], state=BatchState(row["state"]),
            reason=row["reason"], error_code=row["error_code"],
            counts=Counts(row["rows_total"], row["rows_ok"], row["rows_error"]),
            outputs=tuple(json.loads(row["outputs"])),
            created_at=datetime.fromisoformat(row["created_at"]),
            updated_at=datetime.fromisoformat(row["updated_at"]),
            history=history,
            intake_id=row["intake_id"], instance=row["instance"], kind=row["kind"],
            purl_sha256=row["purl_sha256"], source=row["source"],
            sender_auth=row["sender_auth"], signer=row["signer"],
        )

    def get(self, batch_id: int) -> BatchRecord:
        record = self.find(batch_id)
        if record is None:
            raise StorageError(f"no batch {batch_id}")
        return record

    def find(self, batch_id: int) -> BatchRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else self._record(db, row)

    def find_by_name(self, client: str, project: str, data_name: str) -> BatchRecord | None:
        """The batch holding ``data_name`` (failed batches hold no name)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM batches WHERE client = ? AND project = ? AND data_name = ?"
                " AND state != ?",
                (client, project, data_name, BatchState.FAILED.value),
            ).fetchone()
            return None if row is None else self._record(db, row)

    def held_since(self, client: str, project: str, name: str) -> datetime | None:
        """When the batch that holds this name (as sent, or the data file inside) arrived;
        None when no batch holds it (never sent, or every batch of it failed)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT MIN(created_at) FROM batches WHERE client = ? AND project = ?"
                " AND (received_name = ? OR data_name = ?) AND state != ? AND kind = 'batch'",
                (client, project, name, name, BatchState.FAILED.value),
            ).fetchone()
        return datetime.fromisoformat(row[0]) if row and row[0] else None

    def find_by_intake(self, intake_id: str) -> BatchRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM batches WHERE intake_id = ?",
                             (intake_id,)).fetchone()
            return None if row is None else self._record(db, row)

    def finished_since(self, since: datetime | None) -> list[BatchSummary]:
        """Batches that delivered a PURL file, updated at or after ``since`` (all: None)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, client, project, created_at, updated_at FROM batches"
                " WHERE state IN (?, ?) AND updated_at >= ? AND kind = 'batch' ORDER BY id",
                (BatchState.DONE.value, BatchState.DONE_WITH_ERRORS.value,
                 _ts(since) if since else ""),
            ).fetchall()
        return [BatchSummary(r["id"], r["client"], r["project"] or "",
                             datetime.fromisoformat(r["created_at"]),
                             datetime.fromisoformat(r["updated_at"])) for r in rows]

    def search(self, *, client: str | None = None, project: str | None = None,
               status: str | None = None, limit: int = 200) -> list[BatchRecord]:
        """The newest batches first, filtered by client, project and status."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM batches WHERE (? IS NULL OR client = ?)"
                " AND (? IS NULL OR project = ?) AND (? IS NULL OR state = ?)"
                " ORDER BY id DESC LIMIT ?",
                (client, client, project, project, status, status, limit)).fetchall()
            return [self._record(db, r) for r in rows]

    def recent(self, limit: int = 50) -> list[BatchRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM batches ORDER BY id DESC LIMIT ?", (limit,))
            return [self._record(db, r) for r in rows.fetchall()]
