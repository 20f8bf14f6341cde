"""Files larger than one read block: row numbers, values and restarts stay exact.

The expected results come from Python's csv module reading the same bytes, an
independent oracle for what the streaming Arrow path must produce.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random

from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import Submission
from tests.conftest import Harness, read_csv

T = "20261127_101500"


def build(rows: int, seed: int = 7) -> tuple[bytes, list[tuple[int, str, str]], list[list[str]]]:
    """A multi-megabyte CSV with bad rows sprinkled in; returns bytes, errors, good rows."""
    rnd = random.Random(seed)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    header = ["first_name", "email", "city", "note"]
    w.writerow(header)
    errors: list[tuple[int, str, str]] = []
    good: list[list[str]] = []
    for i in range(rows):
        record = i + 2  # the header is row 1
        kind = rnd.random()
        if kind < 0.002:
            out.write(f"Ragged{i},r{i}@x.example\n")
            errors.append((record, "", "has 2 fields, the header has 4"))
        elif kind < 0.004:
            row = [f"Name{i}", "  ", "Town", "x"]
            w.writerow(row)
            errors.append((record, "email", "required value is empty"))
        else:
            note = rnd.choice(["plain", "with, comma", 'say "hi"', "two\nlines", "Zoë €"])
            row = [f"Name{i}", f"user{i}@x.example", rnd.choice(["Paris", "São Paulo"]), note]
            w.writerow(row)
            good.append(row)
    return out.getvalue().encode(), errors, good


def test_errors_and_values_exact_across_blocks(harness: Harness) -> None:
    """~6 MB, bad rows in many blocks: each reported at its row, all good rows exact."""
    data, errors, good = build(120_000)
    assert len(data) > 5 * 1024 * 1024
    path = harness.write(f"big_{T}.csv", data)
    outcome = harness.run(path, project="agreed-all")
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    counts = outcome.batch.counts
    assert (counts.rows_ok, counts.rows_error) == (len(good), len(errors))
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    assert [r[:4] for r in rows[1:]] == good
    reported = [(int(r[0]), r[1], r[2]) for r in read_csv(outcome.errors)[1:]]  # type: ignore[arg-type]
    assert reported == errors
    made = hashlib.sha256(outcome.purl.read_bytes()).hexdigest()  # type: ignore[union-attr]
    assert outcome.batch.purl_sha256 == made, "hashed as written, on the writer's thread"


def test_tokens_are_unique_across_blocks(harness: Harness) -> None:
    """No two rows of a batch share a link, however many blocks the file spans."""
    data, _, good = build(60_000, seed=3)
    outcome = harness.run(harness.write(f"tok_{T}.csv", data), project="agreed-all")
    pages = [r[-1] for r in read_csv(outcome.purl)[1:]]  # type: ignore[arg-type]
    assert len(pages) == len(good) == len(set(pages))


def test_utf8_head_with_windows_1252_later_is_read_again(harness: Harness) -> None:
    """300 KB of ASCII then 'Hélène' in Windows-1252: the whole file is read as 1252."""
    lines = ["first_name,email"] + [f"Name{i},n{i}@x.example" for i in range(20_000)]
    data = ("\n".join(lines) + "\n").encode("ascii") + "Hélène,h@x.example\n".encode("cp1252")
    assert len(data) > 300 * 1024
    outcome = harness.run(harness.write(f"late_{T}.csv", data))
    assert outcome.state is BatchState.DONE
    assert outcome.batch.counts.rows_ok == 20_001
    raw = outcome.purl.read_bytes()  # type: ignore[union-attr]
    assert "Hélène,h@x.example,https://".encode("cp1252") in raw
    assert outcome.batch.purl_sha256 == hashlib.sha256(raw).hexdigest(), "the second pass's"
    assert harness.outputs() == [f"PURL_late_{T}.csv", f"PURL_late_{T}.csv.flg"]


def test_undefined_byte_deep_in_the_file(harness: Harness) -> None:
    """0x9D on line 20,002 (past the head) is found with its line number."""
    lines = ["first_name,email"] + [f"Name{i},n{i}@x.example" for i in range(20_000)]
    data = ("\n".join(lines) + "\n").encode() + b"B\x9dd,b@x.example\n"
    outcome = harness.run(harness.write(f"deep_{T}.csv", data))
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason is not None
    assert outcome.batch.reason.startswith("line 20002 has the byte 0x9D")
    assert harness.outputs() == [f"PURL_deep_{T}_errors.csv"]


def test_every_row_bad_is_failed_with_the_row_errors(harness: Harness) -> None:
    """When no row can be used the batch fails, and the error file lists each row."""
    path = harness.write(f"allbad_{T}.csv", b"first_name,email,city\nA, ,x\nB,,y\n")
    outcome = harness.run(path, project="agreed")
    assert outcome.state is BatchState.FAILED
    assert outcome.purl is None
    assert read_csv(outcome.errors) == [  # type: ignore[arg-type]
        ["row", "column", "reason"],
        ["", "", "no row could be used: every data row has an error (see the error list)"],
        ["2", "email", "required value is empty"],
        ["3", "email", "required value is empty"],
    ]
    assert not (harness.out / f"PURL_allbad_{T}.csv").exists()


def test_progress_reaches_the_end(harness: Harness) -> None:
    """The progress callback (the CLI's bar) moves forward and ends at the file size."""
    data, _, _ = build(40_000, seed=5)
    path = harness.write(f"prog_{T}.csv", data)
    seen: list[tuple[int, int]] = []
    outcome = harness.processor.process(
        Submission(path=path, received_name=path.name, channel="test", client_id="acme",
                   project_id="spring"),
        harness.out, lambda done, total: seen.append((done, total)),
    )
    assert outcome.state is BatchState.DONE_WITH_ERRORS  # build() sprinkles bad rows
    assert len(seen) > 1
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (len(data), len(data))
