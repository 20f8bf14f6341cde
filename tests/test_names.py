"""Name semantics: a name is held only by a batch that did not fail; every failure says
whether the same name may be sent again; the store upgrades an older data directory."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from purlgate.config import parse_config
from purlgate.core.archive import UnwrapLimits, read_zip, unwrap
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import Submission
from purlgate.region import build_region
from purlgate.store import MIGRATIONS, SqliteBatchStore
from tests.config_builder import own
from tests.conftest import DATA, TEST_CONFIG, Harness
from tests.mail_helpers import (
    PASSWORD,
    SENDER,
    Sink,
    T,
    aes_zip,
    client_mail,
    plain_zip,
    rows,
    start,
)

NAME = f"acme_spring_{T}_00.csv"

# The batch store's schema as the first release made it (before user_version).
FIRST_RELEASE_SCHEMA = """
CREATE TABLE batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, region TEXT NOT NULL, client TEXT NOT NULL,
    project TEXT, channel TEXT NOT NULL, received_name TEXT NOT NULL, data_name TEXT,
    sha256 TEXT, state TEXT NOT NULL, reason TEXT, error_code TEXT,
    rows_total INTEGER NOT NULL DEFAULT 0, rows_ok INTEGER NOT NULL DEFAULT 0,
    rows_error INTEGER NOT NULL DEFAULT 0, outputs TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, intake_id TEXT UNIQUE);
CREATE UNIQUE INDEX batches_claimed_name
    ON batches (client, project, data_name) WHERE data_name IS NOT NULL;
CREATE TABLE transitions (batch_id INTEGER NOT NULL REFERENCES batches(id),
    state TEXT NOT NULL, at TEXT NOT NULL);
CREATE INDEX transitions_batch ON transitions (batch_id);
"""


def test_a_failed_batch_lets_its_name_go(harness: Harness) -> None:
    """A file that fails after its name was claimed (header only) frees the name: the
    corrected file under the same name is processed; a Done batch keeps its name."""
    path = harness.write(NAME, b"first_name,email\n")
    failed = harness.run(path)
    assert failed.state is BatchState.FAILED
    assert failed.batch.data_name == NAME, "the failed batch still says what it was"
    fixed = harness.run(harness.write(NAME, b"first_name,email\nAna,a@x.example\n"))
    assert fixed.state is BatchState.DONE
    again = harness.run(harness.write(NAME, b"first_name,email\nBo,b@x.example\n"))
    assert again.state is BatchState.FAILED
    assert again.batch.error_code == "duplicate-name"


def test_an_older_data_directory_is_upgraded_in_place(tmp_path: Path) -> None:
    """A store made by the first release (no user_version, the old index) opens at the
    current schema with every batch and transition kept; its failed batch's name is
    free afterwards and its Done batch's name is still held."""
    path = tmp_path / "batches.sqlite3"
    now = datetime(2026, 11, 1, tzinfo=UTC).isoformat()
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_RELEASE_SCHEMA)
        for i, (name, state) in enumerate([("a.csv", "Failed"), ("b.csv", "Done")], 1):
            db.execute("INSERT INTO batches (region, client, project, channel, received_name,"
                       " data_name, state, created_at, updated_at) VALUES"
                       " ('usa','acme','spring','smtp',?,?,?,?,?)", (name, name, state, now, now))
            db.execute("INSERT INTO transitions VALUES (?, ?, ?)", (i, state, now))
    store = SqliteBatchStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert [b.received_name for b in store.search()] == ["b.csv", "a.csv"]
    assert store.get(1).history[0][0] is BatchState.FAILED
    assert store.held_since("acme", "spring", "a.csv") is None
    assert store.held_since("acme", "spring", "b.csv") is not None
    SqliteBatchStore(path)  # opening again changes nothing
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(Exception, match="newer than this release"):
        SqliteBatchStore(newer)


@pytest.mark.asyncio
async def test_email_failure_carries_the_error_list_and_frees_the_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that fails after its name was claimed (no delimiter fits): the failure
    reply attaches the error list (AES ZIP, the client's password) and says the name is
    free; the corrected file under the same name then gets its PURL file."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    running = await start(tmp_path, sink)
    try:
        await _fail_then_fix(running.send, sink)
    finally:
        await running.shutdown()
        await sink.stop()


async def _fail_then_fix(send: Any, sink: Sink) -> None:
    bad = b"first_name,email\nAna,a@x.example,extra\nBo,b@x.example,extra\n"
    await send(client_mail([(f"{NAME[:-4]}.zip", aes_zip({NAME: bad}),
                                     "application/zip")]))
    reply = (await sink.wait_to(SENDER))[0].message
    body = reply.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Your data file could not be processed." in body
    assert "The file name is free again: you may send the corrected file under the same " \
           "name." in body
    parts = list(reply.iter_attachments())
    assert [p.get_filename() for p in parts] == [f"PURL_acme_spring_{T}_00_errors.zip"]
    errors = read_zip(parts[0].get_payload(decode=True), PASSWORD).members[
        f"PURL_acme_spring_{T}_00_errors.csv"].decode().splitlines()
    assert errors == ["row,column,reason",
                      ',,"cannot tell the delimiter: no one of , ; | or tab gives the same '
                      'number of columns in the header and the first rows"']
    await send(client_mail([(f"{NAME[:-4]}.zip", aes_zip({NAME: rows(3)}),
                                     "application/zip")]))
    second = (await sink.wait_to(SENDER, 2))[1].message
    body = second.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Status: Done" in body


def test_results_and_state_are_private(tmp_path: Path) -> None:
    """`purlgate process`: the data directory is 0700, its store 0600, the PURL and
    flag files 0640 (the group may read results), nothing world-readable."""
    exe = str(Path(sys.executable).with_name("purlgate"))
    shutil.copy(DATA / "acme_spring_20261127_101500_00.csv", tmp_path)
    result = subprocess.run([exe, "process", "acme_spring_20261127_101500_00.csv"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "var" / "usa") == 0o700
    assert mode(tmp_path / "var" / "usa" / "batches.sqlite3") == 0o600
    assert mode(tmp_path / "var" / "usa" / "rows") == 0o700
    out = tmp_path / "out"
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "PURL_acme_spring_20261127_101500_00.csv": 0o640,
        "PURL_acme_spring_20261127_101500_00.csv.flg": 0o640}
    for path in (tmp_path / "var").rglob("*"):
        assert mode(path) & 0o007 == 0, path


def test_unwrapped_data_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """The data file taken out of a ZIP (and any scratch) is readable by us alone, even
    in a process whose umask would allow more."""
    old = os.umask(0o022)
    try:
        zip_path = tmp_path / "a_20261127_101500.zip"
        zip_path.write_bytes(plain_zip({"a_20261127_101500.csv": b"x,y\n1,2\n"}))
        work = tmp_path / "work"
        work.mkdir()
        out = unwrap(zip_path, zip_path.name, work, password=None, require_aes=False,
                     limits=UnwrapLimits(10_000, 100.0, 1_000))
        assert out.path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.asyncio
async def test_an_attachment_named_dotdot_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ZIP attached under the name '..' never becomes a path on our disk: it is read
    like any other (the data file inside names the batch) and answered, and the queue
    moves on to the next message."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    running = await start(tmp_path, sink)
    try:
        await running.send(client_mail([("..", aes_zip({NAME: rows(2)}), "application/zip")]))
        first = (await sink.wait_to(SENDER))[0].message
        assert "Status: Done" in first.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        other = f"acme_spring_{T}_01.csv"
        await running.send(client_mail([(f"{other[:-4]}.zip", aes_zip({other: rows(2)}),
                                         "application/zip")]))
        second = (await sink.wait_to(SENDER, 2))[1].message
        assert "Status: Done" in second.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        # No folder per message is left, and no client data: the worker's own scratch
        # files stay for the next message, emptied.
        work = own(running.data_dir / "mail-work")
        assert [p.name for p in work.iterdir() if not p.name.startswith("t")] == []
        assert {p.stat().st_size for p in work.rglob("*") if p.is_file()} <= {0}
        assert running.spooled() == []
    finally:
        await running.shutdown()
        await sink.stop()


def test_results_mode_is_configurable(tmp_path: Path) -> None:
    """results_mode sets the mode of PURL and flag files (here 0600)."""
    text = TEST_CONFIG.replace('public_base_url = "https://purl.test"',
                               'public_base_url = "https://purl.test"\nresults_mode = "0600"')
    region = build_region(parse_config(text), "usa", data_dir=tmp_path / "state")
    out = tmp_path / "out"
    out.mkdir()
    outcome = region.processor.process(
        Submission(path=DATA / "acme_spring_20261127_101500_00.csv",
                   received_name="acme_spring_20261127_101500_00.csv", channel="test",
                   client_id="acme", project_id="spring"), out)
    region.close()
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o600}
    assert outcome.purl is not None
