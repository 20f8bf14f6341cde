"""The batch core end to end on the fixture files: exact outcomes, nothing partial."""

from __future__ import annotations

import hashlib
import re

import pytest

from purlgate.core.lifecycle import BatchState, EventKind
from tests.conftest import DATA, Harness, read_csv, scratch_data_left

T = "20261127_101500"
LINK = re.compile(r"^https://purl\.test/t/[0-9a-f]{32}\.jpg$")
PAGE = re.compile(r"^https://purl\.test/p/[0-9a-f]{32}$")


def assert_links(rows: list[list[str]]) -> None:
    tokens = set()
    for row in rows[1:]:
        assert LINK.match(row[-2]), row[-2]
        assert PAGE.match(row[-1]), row[-1]
        token = row[-1].rsplit("/", 1)[1]
        assert row[-2] == f"https://purl.test/t/{token}.jpg"
        tokens.add(token)
    assert len(tokens) == len(rows) - 1, "every row gets its own token"


def assert_no_partial(h: Harness) -> None:
    hidden = [p.name for p in h.out.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temporary files left behind: {hidden}"
    assert scratch_data_left(h.tmp / "work") == [], "scratch data left behind"


@pytest.mark.parametrize(
    ("name", "delimiter"),
    [
        (f"comma_{T}.csv", ","),
        (f"semicolon_{T}.csv", ";"),
        (f"pipe_{T}.dat", "|"),
        (f"tab_{T}.txt", "\t"),
        (f"tab_{T}.tsv", "\t"),
    ],
)
def test_each_delimiter_round_trips(harness: Harness, name: str, delimiter: str) -> None:
    """Any of , ; | tab in any data extension: same delimiter out, values and links added."""
    outcome = harness.fixture(name)
    assert outcome.state is BatchState.DONE
    assert outcome.purl is not None
    assert outcome.purl.name == f"PURL_{name}"
    rows = read_csv(outcome.purl, delimiter=delimiter)
    source = read_csv(DATA / name, delimiter=delimiter)
    assert rows[0] == [*source[0], "thumbnail_1", "landingPage"]
    assert [r[:-2] for r in rows[1:]] == source[1:]
    assert_links(rows)
    assert harness.outputs() == [f"PURL_{name}", f"PURL_{name}.flg"]
    assert (harness.out / f"PURL_{name}.flg").read_bytes() == b""
    assert_no_partial(harness)


def test_demo_file_selects_client_and_project_by_name(harness: Harness) -> None:
    """The recommended name alone picks acme/spring; 20 rows in, 20 rows with links out."""
    outcome = harness.fixture("acme_spring_20261127_101500_00.csv", client=None, project=None)
    assert outcome.state is BatchState.DONE
    assert outcome.batch.client == "acme"
    assert outcome.batch.project == "spring"
    assert outcome.batch.counts.rows_ok == 20
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    assert len(rows) == 21
    assert rows[1][:5] == ["José", "Tester0", "user0@acme.example", "Paris, FR", "0.50"]
    assert_links(rows)


def test_output_is_written_like_the_stdlib_csv_module(harness: Harness) -> None:
    """Quotes only where needed, doubled quotes, embedded newline kept byte for byte."""
    outcome = harness.fixture(f"quoted_{T}.csv")
    assert outcome.state is BatchState.DONE
    text = outcome.purl.read_bytes().decode()  # type: ignore[union-attr]
    lines = text.split("\n")
    assert lines[0] == "first_name,email,note,thumbnail_1,landingPage"
    assert lines[1].startswith('Ada,ada@x.example,"likes tea, cake",https://purl.test/t/')
    assert lines[2] == '"Lin ""the fox""",lin@x.example,"line one'
    assert lines[3].startswith('line two",https://purl.test/t/')
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    assert rows[2][:3] == ['Lin "the fox"', "lin@x.example", "line one\nline two"]


def test_bom_and_crlf_are_kept(harness: Harness) -> None:
    """UTF-8 with BOM and CRLF in, the same out; the BOM is not part of the first name."""
    outcome = harness.fixture(f"bom_crlf_{T}.csv")
    assert outcome.state is BatchState.DONE
    data = outcome.purl.read_bytes()  # type: ignore[union-attr]
    assert data.startswith(b"\xef\xbb\xbffirst_name,email,city,thumbnail_1,landingPage\r\n")
    assert data.count(b"\r\n") == 2
    assert "José,jose@x.example,São Paulo,https://" in data.decode("utf-8-sig")
    assert outcome.batch.purl_sha256 == hashlib.sha256(data).hexdigest(), "the BOM too"


def test_windows_1252_in_windows_1252_out(harness: Harness) -> None:
    """Accents and the euro sign survive; the PURL file is Windows-1252 with ; like the input."""
    outcome = harness.fixture(f"cp1252_{T}.csv")
    assert outcome.state is BatchState.DONE
    rows = read_csv(outcome.purl, encoding="cp1252", delimiter=";")  # type: ignore[arg-type]
    assert rows[0] == ["first_name", "email", "amount", "thumbnail_1", "landingPage"]
    assert rows[1][:3] == ["Hélène", "helene@x.example", "12,50 €"]
    assert rows[2][:3] == ["François", "f@x.example", "7 €"]
    assert b"\x80" in outcome.purl.read_bytes()  # type: ignore[union-attr]  # cp1252 euro


def test_undefined_windows_1252_byte_fails_with_its_line(harness: Harness) -> None:
    """0x81 is neither UTF-8 nor Windows-1252: Failed, naming the line; no PURL file."""
    outcome = harness.fixture(f"undefined_byte_{T}.csv")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-encoding"
    assert outcome.batch.reason == (
        "line 3 has the byte 0x81, which is neither UTF-8 nor Windows-1252; "
        "save the file as UTF-8 (or Windows-1252) and send it again"
    )
    assert harness.outputs() == [f"PURL_undefined_byte_{T}_errors.csv"]
    assert_no_partial(harness)


def test_ragged_rows_become_row_errors_and_the_rest_go_on(harness: Harness) -> None:
    """Rows 3 and 5 (as the file numbers them) are reported; the other three are done."""
    outcome = harness.fixture(f"ragged_{T}.csv")
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    counts = outcome.batch.counts
    assert (counts.rows_total, counts.rows_ok, counts.rows_error) == (5, 3, 2)
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    assert [r[0] for r in rows[1:]] == ["Ada", "Cy", "Eve"]
    assert read_csv(outcome.errors) == [  # type: ignore[arg-type]
        ["row", "column", "reason"],
        ["3", "", "has 2 fields, the header has 3"],
        ["5", "", "has 4 fields, the header has 3"],
    ]
    assert harness.outputs() == [
        f"PURL_ragged_{T}.csv", f"PURL_ragged_{T}.csv.flg", f"PURL_ragged_{T}_errors.csv"
    ]


def test_header_spaces_are_stripped(harness: Harness) -> None:
    """' first_name , email ,city ' is read as first_name, email, city."""
    outcome = harness.fixture(f"header_spaces_{T}.csv", project="agreed")
    assert outcome.state is BatchState.DONE
    assert read_csv(outcome.purl)[0] == [  # type: ignore[arg-type]
        "first_name", "email", "city", "thumbnail_1", "landingPage"
    ]


def test_missing_required_column_fails_with_the_list(harness: Harness) -> None:
    """No email column: Failed with the missing list and the header it saw."""
    outcome = harness.fixture(f"missing_required_{T}.csv", project="agreed")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "missing required column(s): email. The header has: first_name, city"
    )
    assert harness.outputs() == [f"PURL_missing_required_{T}_errors.csv"]
    assert read_csv(harness.out / f"PURL_missing_required_{T}_errors.csv") == [
        ["row", "column", "reason"],
        ["", "", "missing required column(s): email. The header has: first_name, city"],
    ]
    assert [e.kind for e in harness.events] == [EventKind.RECEIVED, EventKind.FAILED]


def test_empty_required_value_is_a_row_error(harness: Harness) -> None:
    """A blank email in row 3 is reported with its column; rows 2 and 4 are done."""
    outcome = harness.fixture(f"empty_required_{T}.csv", project="agreed")
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    assert [r[0] for r in read_csv(outcome.purl)[1:]] == ["Ada", "Cy"]  # type: ignore[arg-type]
    assert read_csv(outcome.errors)[1:] == [["3", "email", "required value is empty"]]  # type: ignore[arg-type]


def test_agreed_columns_only_in_file_order(harness: Harness) -> None:
    """A project with agreed columns drops the others and keeps the file's order."""
    path = harness.write(f"extra_{T}.csv",
                         b"city,secret,email,first_name\nRome,xyz,a@x.example,Ada\n")
    outcome = harness.run(path, project="agreed")
    assert outcome.state is BatchState.DONE
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    assert rows[0] == ["city", "email", "first_name", "thumbnail_1", "landingPage"]
    assert rows[1][:3] == ["Rome", "a@x.example", "Ada"]


def test_duplicate_header_names_fail(harness: Harness) -> None:
    """A header naming email twice is refused with both positions."""
    outcome = harness.fixture(f"duplicate_header_{T}.csv")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "the header names 'email' twice (columns 1 and 3); give every column its own name"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (f"empty_{T}.csv", "the file is empty"),
        (f"header_only_{T}.csv", "the file has a header but no data rows"),
    ],
)
def test_no_data_fails(harness: Harness, name: str, reason: str) -> None:
    """Empty and header-only files are Failed with a plain reason, no PURL file."""
    outcome = harness.fixture(name)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "no-data"
    assert outcome.batch.reason == reason
    assert outcome.purl is None
    assert not any(p.name.startswith("PURL_") and p.suffix == ".csv"
                   and "_errors" not in p.name for p in harness.out.iterdir())


def test_ambiguous_delimiter_names_the_candidates(harness: Harness) -> None:
    """'a,b;c' splits evenly on , and ; : an error naming both, not a guess."""
    outcome = harness.fixture(f"ambiguous_{T}.csv")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "cannot tell the delimiter: the header and rows split evenly on comma (,) and "
        "semicolon (;); use only one of , ; | or tab between columns"
    )


def test_name_without_time_of_day_is_refused(harness: Harness) -> None:
    """The message shows the recommended form; nothing is written, the name is not claimed."""
    outcome = harness.fixture("no_time_of_day.csv")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "'no_time_of_day.csv' does not contain an exact time of day; name the file like "
        "<client>_<project>_YYYYMMdd_HHMMss_mm.<ext>, for example "
        "acme_spring_20261127_101500_00.csv"
    )
    assert outcome.batch.data_name is None
    assert harness.outputs() == []


def test_zip_with_one_data_file_uses_the_inner_name(harness: Harness) -> None:
    """The PURL file is named after the data file inside the ZIP."""
    outcome = harness.fixture(f"one_file_{T}.zip")
    assert outcome.state is BatchState.DONE
    assert outcome.batch.data_name == f"inner_{T}.csv"
    assert harness.outputs() == [f"PURL_inner_{T}.csv", f"PURL_inner_{T}.csv.flg"]
    assert_no_partial(harness)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (f"two_files_{T}.zip",
         f"the ZIP holds 2 data files (a_{T}.csv, b_{T}.csv); send one data file per ZIP"),
        (f"dotdot_{T}.zip",
         f"the ZIP has an entry that points outside it ('../evil_{T}.csv')"),
    ],
)
def test_refused_zips(harness: Harness, name: str, reason: str) -> None:
    """Bad ZIPs fail with a specific reason and write nothing at all."""
    outcome = harness.fixture(name)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-zip"
    assert outcome.batch.reason == reason
    assert harness.outputs() == []
    assert not (harness.tmp / "evil_20261127_101500.csv").exists()
    assert_no_partial(harness)


def test_duplicate_name_is_refused_and_touches_nothing(harness: Harness) -> None:
    """The second file of the same name is refused, even after a restart of the store."""
    first = harness.fixture(f"comma_{T}.csv")
    assert first.state is BatchState.DONE
    before = {p.name: p.read_bytes() for p in harness.out.iterdir()}
    other = harness.write(f"comma_{T}.csv", b"first_name,email\nMallory,m@x.example\n")
    second = harness.run(other)
    assert second.state is BatchState.FAILED
    assert second.batch.error_code == "duplicate-name"
    assert second.batch.reason == (
        f"a file named 'comma_{T}.csv' was already received for project spring at "
        "2026-11-27 10:15:00 UTC; it was not processed again and nothing was overwritten. "
        "Send new data under a new name (with a new time of day)"
    )
    after = {p.name: p.read_bytes() for p in harness.out.iterdir()}
    assert after == before


def test_same_name_in_another_project_is_not_a_duplicate(harness: Harness) -> None:
    """Duplicates are per client and project."""
    assert harness.fixture(f"comma_{T}.csv").state is BatchState.DONE
    harness.out = harness.tmp / "out2"
    harness.out.mkdir()
    assert harness.fixture(f"comma_{T}.csv", project="agreed").state is BatchState.DONE


def test_lifecycle_events_and_history(harness: Harness) -> None:
    """Received, loaded then summary are published; the store keeps each transition's
    time; the end carries the SHA-256 of the file received and of the PURL file made."""
    outcome = harness.fixture(f"ragged_{T}.csv")
    assert [e.kind for e in harness.events] == [
        EventKind.RECEIVED, EventKind.LOADED, EventKind.SUMMARY]
    end = harness.events[-1].batch
    assert end.state is BatchState.DONE_WITH_ERRORS
    assert [s for s, _ in outcome.batch.history] == [
        BatchState.INITIALIZING, BatchState.IN_PROGRESS, BatchState.DONE_WITH_ERRORS
    ]
    received = hashlib.sha256((DATA / f"ragged_{T}.csv").read_bytes()).hexdigest()
    made = hashlib.sha256(outcome.purl.read_bytes()).hexdigest()  # type: ignore[union-attr]
    assert (end.sha256, end.purl_sha256) == (received, made)
    stored = harness.store.get(outcome.batch.id)
    assert (stored.sha256, stored.purl_sha256) == (received, made)


def test_fixed_dialect_prefix_suffix_and_no_extra_files(harness: Harness) -> None:
    """Project 'strict': ; and UTF-8 fixed, OUT_<stem>_v1.<ext>, no flag, no error file."""
    outcome = harness.fixture(f"semicolon_{T}.csv", project="strict")
    assert outcome.state is BatchState.DONE
    assert harness.outputs() == [f"OUT_semicolon_{T}_v1.csv"]


def test_fixed_utf8_refuses_windows_1252(harness: Harness) -> None:
    """A project that fixes UTF-8 gets a clear error for a Windows-1252 file."""
    outcome = harness.fixture(f"cp1252_{T}.csv", project="strict")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "line 2 is not valid UTF-8, the encoding agreed for this project; "
        "save the file as UTF-8 and send it again"
    )


def test_name_naming_another_project_of_the_client(harness: Harness) -> None:
    """acme_nosuch_... names a project acme does not have: refused, listing the projects."""
    path = harness.write(f"acme_nosuch_{T}_00.csv", b"a,b\n1,2\n")
    outcome = harness.run(path, project=None)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "the file name names project 'nosuch', which client acme does not have; "
        "projects: spring, agreed, agreed-all, strict"
    )


def test_name_naming_another_client_is_refused(harness: Harness) -> None:
    """A file from acme named for globex is refused rather than filed under either."""
    path = harness.write(f"globex_main_{T}_00.csv", b"a,b\n1,2\n")
    outcome = harness.run(path, project=None)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "the file name names client 'globex', but it came from client acme"
    )


def test_existing_output_is_never_overwritten(harness: Harness) -> None:
    """If the PURL name already exists in the folder, the batch fails and leaves it alone."""
    (harness.out / f"PURL_comma_{T}.csv").write_bytes(b"precious")
    outcome = harness.fixture(f"comma_{T}.csv")
    assert outcome.state is BatchState.FAILED
    assert (harness.out / f"PURL_comma_{T}.csv").read_bytes() == b"precious"
    assert_no_partial(harness)


def test_purl_file_named_after_a_purl_file_is_refused(harness: Harness) -> None:
    """A file that already has thumbnail_1 (a PURL file sent back) is refused, not doubled."""
    path = harness.write(f"back_{T}.csv", b"email,thumbnail_1,landingPage\na@x,t,l\n")
    outcome = harness.run(path)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-header"


def test_a_file_cut_mid_row_is_refused_whole(harness: Harness) -> None:
    """A transfer that stopped early (the last line short, no line end) fails as cut off
    at that row, with no PURL file; the whole file then goes through under the same
    name. A short last line that does end, or a whole last line without a line end,
    is not a cut."""
    name = "acme_spring_20261127_121500_00.csv"
    whole = b"first_name,email,city\n" + b"".join(
        b"N%d,n%d@x.example,Paris\n" % (i, i) for i in range(5)) + b"Bo,b@x.example,Rome\n"
    cut = harness.run(harness.write(name, whole[:-12]))
    assert cut.state is BatchState.FAILED
    assert cut.batch.error_code == "cut-off"
    assert cut.batch.reason == (
        "the file looks cut off at row 7: its last line has 2 of the 3 fields and no line "
        "end, as when an upload or a copy stops early; send the whole file again")
    assert not any(p.name.startswith("PURL_") and p.suffix == ".csv" and "_errors" not in p.name
                   for p in harness.out.iterdir())
    assert harness.run(harness.write(name, whole)).state is BatchState.DONE
    short_but_ended = harness.run(harness.write(
        "acme_spring_20261127_121501_00.csv", whole + b"Cy,c@x.example\n"))
    assert short_but_ended.state is BatchState.DONE_WITH_ERRORS
    no_final_eol = harness.run(harness.write("acme_spring_20261127_121502_00.csv", whole[:-1]))
    assert no_final_eol.state is BatchState.DONE


def test_the_same_bad_file_twice_fails_twice_for_its_own_reason(harness: Harness) -> None:
    """A failed batch frees its name, so the same bad file can come again: it fails again
    with the same reason (not an internal error over the earlier error file), and the
    error file is the newer one."""
    name = "acme_agreed_20261127_131500_00.csv"
    bad = b"first_name,email,city\n,a@x.example,P\n"
    first = harness.run(harness.write(name, bad), project="agreed")
    second = harness.run(harness.write(name, bad), project="agreed")
    assert [first.state, second.state] == [BatchState.FAILED, BatchState.FAILED]
    assert first.batch.reason == second.batch.reason
    assert second.batch.error_code == "no-data"
    assert second.errors is not None
    assert second.errors.read_text().splitlines()[1:] == [
        ",,no row could be used: every data row has an error (see the error list)",
        "2,first_name,required value is empty"]


def test_a_stray_quote_is_reported_and_every_line_counts(harness: Harness) -> None:
    """A quote opened in row 9 and closed in line 15 makes seven lines one row of the
    wrong width: the error says so with both lines, each swallowed line counts as a row
    with an error, and the counts add up to the 20 lines sent."""
    lines = [f"N{i},e{i}@x.example,City{i}" for i in range(1, 21)]
    lines[7] = 'N8,"e8@x.example,City8'  # row 9 as a spreadsheet shows it
    lines[13] = 'N14,e14@x.example"'  # closes the quote; the merged row has 2 fields
    body = ("first_name,email,city\n" + "\n".join(lines) + "\n").encode()
    outcome = harness.run(harness.write("acme_spring_20261127_141500_00.csv", body))
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    counts = outcome.batch.counts
    assert (counts.rows_total, counts.rows_ok, counts.rows_error) == (20, 13, 7)
    assert outcome.errors is not None
    assert outcome.errors.read_text().splitlines()[1:] == [
        '9,,"row 9 opens a quote that closes in line 15: lines 9 to 15 became one row of 2 '
        'fields, the header has 3; check the quotes"']
    unclosed = lines[:]
    unclosed[13] = "N14,e14@x.example,City14"
    never = harness.run(harness.write("acme_spring_20261127_141501_00.csv",
                                      ("first_name,email,city\n" + "\n".join(unclosed)
                                       + "\n").encode()))
    assert never.errors is not None
    assert "row 9 opens a quote that never closes: lines 9 to 21 (the end of the file)" \
        in never.errors.read_text()
    assert never.batch.counts.rows_total == 20
