"""Validate-only: a file checked as a batch would check it, and nothing made, kept,
claimed or paid for (`purlgate validate`; the mail and SFTP channels use the same core)."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import aiosmtplib
import pytest

from tests.mail_helpers import (
    INBOUND,
    PASSWORD,
    SENDER,
    Sink,
    T,
    aes_zip,
    client_mail,
    drained,
    good_mail,
    reply_zip,
    start,
)
from tests.sftp_helpers import Keys, openssh
from tests.sftp_helpers import Running as SftpRunning
from tests.test_cli import DATA, DEMO, purlgate

RAGGED = "ragged_20261127_101500.csv"


def test_a_valid_file_is_said_valid_and_its_name_stays_free(tmp_path: Path) -> None:
    """Exit 0 and "valid: N rows would be processed"; nothing in ./out, no row data, no
    name taken: the real file of that name is then processed as usual. The batch view
    lists the validation as one, and the links' index never sees it."""
    shutil.copy(DATA / DEMO, tmp_path / DEMO)
    checked = purlgate("validate", DEMO, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == [
        "valid: 20 rows would be processed.",
        "Rows read: 20; without errors: 20; with errors: 0.",
        "This was a validation only: nothing was processed, rendered or kept, and it took "
        "no file name."]
    assert list((tmp_path / "out").iterdir()) == []
    assert not list((tmp_path / "var" / "usa" / "rows").glob("batch-*"))
    real = purlgate("process", DEMO, cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    assert "status    Done" in real.stdout
    view = json.loads(purlgate("batches", "--json", cwd=tmp_path).stdout)["batches"]
    assert [(b["kind"], b["status"]) for b in view] == [("batch", "Done"),
                                                         ("validation", "Done")]
    again = purlgate("validate", DEMO, cwd=tmp_path)
    assert again.returncode == 0
    assert (f"Note: a file of this name was already received at "
            f"{view[0]['received_at'][:10]}") in again.stdout


def test_row_errors_are_listed_in_the_usual_error_file(tmp_path: Path) -> None:
    """Exit 1, the counts, and the error file in the usual format (row, column,
    reason) under a name of its own; no PURL file."""
    checked = purlgate("validate", str(DATA / RAGGED), "--client", "acme", "--project",
                       "spring", "--out", "o", cwd=tmp_path)
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[0] == (
        "3 of 5 rows would be processed; 2 have errors (see the error file).")
    (report,) = (tmp_path / "o").iterdir()
    assert report.name == "validation_PURL_ragged_20261127_101500_errors.csv"
    with report.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "column", "reason"]
    assert len(rows) == 3 and all(r[0] for r in rows[1:])


def test_a_file_that_cannot_be_used_says_why(tmp_path: Path) -> None:
    """A file-level problem (a header and no row) is the first line, also in the error
    file; exit 1."""
    checked = purlgate("validate", str(DATA / "header_only_20261127_101500.csv"),
                       "--client", "acme", "--project", "spring", cwd=tmp_path)
    assert checked.returncode == 1
    assert checked.stdout.startswith("not valid: ")
    reason = checked.stdout.splitlines()[0].removeprefix("not valid: ").rstrip(".")
    (report,) = (tmp_path / "out").iterdir()
    assert reason in report.read_text()


@pytest.mark.asyncio
async def test_mail_to_the_validate_address_is_checked_and_answered_not_processed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message to sftp-usa+validate@ is answered with the report (and the error file,
    AES-zipped, when there are errors); nothing is processed or notified, and the same
    file sent to the region address afterwards is processed as usual. Another
    sub-address is no address of ours (no relay)."""
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    run = await start(tmp_path, sink)
    validate_at = INBOUND.replace("@", "+validate@")
    try:
        await run.send(good_mail(), to=validate_at)
        (reply,) = await sink.wait_to(SENDER, timeout=60)
        body = str(reply.message.get_body(("plain",)).get_content()).replace(  # type: ignore[union-attr]
            "\r\n", "\n")
        assert body.startswith("Your data file was checked.\n\nvalid: 20 rows would be "
                               "processed.\n")
        assert "it took no file name" in body
        assert reply.mail_from == validate_at and list(reply.message.iter_attachments()) == []
        name = f"acme_spring_{T}_01"
        bad = (DATA / RAGGED).read_bytes()
        await run.send(client_mail([(f"{name}.zip", aes_zip({f"{name}.csv": bad}),
                                     "application/zip")]), to=validate_at)
        second = (await sink.wait_to(SENDER, 2, timeout=60))[1]
        text = str(second.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
        assert "3 of 5 rows would be processed; 2 have errors" in text
        assert list(reply_zip(second)) == [f"validation_PURL_{name}_errors.csv"]
        await drained(run.gateway)
        assert sink.to("campaigns@acme.example") == [], "no notification for a validation"
        await run.send(good_mail())  # the real file, same name: processed as usual
        third = (await sink.wait_to(SENDER, 3, timeout=60))[2]
        assert "Your data file was processed." in str(
            third.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await run.send(good_mail(), to=INBOUND.replace("@", "+other@"))
    finally:
        await run.shutdown()
        await sink.stop()


@pytest.mark.asyncio
async def test_an_upload_to_validate_is_checked_and_reported_in_downloads(
        running: SftpRunning, keys: Keys, tmp_path: Path) -> None:
    """OpenSSH sftp puts a file into /spring/Validate: the report
    (<name>_validation.txt) and the error file appear in Downloads, no PURL file, and
    Validate is left empty; the same name then goes into Uploads and is processed."""
    name = f"acme_spring_{T}_05.csv"
    local = tmp_path / name
    local.write_bytes((DATA / RAGGED).read_bytes())
    listed = await asyncio.to_thread(openssh, running, "ls /spring\n", key=keys.acme)
    assert "/spring/Validate" in listed.stdout.split()
    put = await asyncio.to_thread(openssh, running, f"put {local} /spring/Validate/\n",
                                  key=keys.acme)
    assert put.returncode == 0, put.stderr
    report = await running.wait_for(running.downloads() / f"{name}_validation.txt")
    assert report.read_text().splitlines()[:2] == [
        f"{name}, uploaded to Validate:",
        "3 of 5 rows would be processed; 2 have errors (see the error file)."]
    errors = running.downloads() / f"validation_PURL_acme_spring_{T}_05_errors.csv"
    assert errors.exists()
    assert not (running.downloads() / f"PURL_{name}").exists()
    assert list((running.uploads().parent / "Validate").iterdir()) == []
    put = await asyncio.to_thread(openssh, running, f"put {local} /spring/Uploads/\n",
                                  key=keys.acme)
    assert put.returncode == 0, put.stderr
    await running.wait_for(running.downloads() / f"PURL_{name}")
