"""Validate-only: a file checked as a batch would check it, and nothing made, kept,
claimed or paid for (`purlgate validate`; the mail and SFTP channels use the same core)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

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
