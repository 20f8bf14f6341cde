"""The row store: what the core writes per render block is what the web side reads;
sealed at rest with the region's rows key, and only the columns a project's pages read."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from purlgate.config import parse_config
from purlgate.core.lifecycle import BatchState
from purlgate.region import build_region
from purlgate.renderers.embedded import decode
from purlgate.rowstore import ROWS_PER_CHUNK, ArrowRowStore
from tests.config_builder import region_toml
from tests.conftest import KEY, Harness, make_harness, read_csv

ROWS_KEY = bytes(range(100, 132))


def block(start: int, n: int) -> dict[str, pa.Array]:
    return {"name": pa.array([f"n{i}" for i in range(start, start + n)]),
            "email": pa.array([f"e{i}@x.example" for i in range(start, start + n)])}


def test_blocks_of_any_size_are_found_by_ordinal(tmp_path: Path) -> None:
    """Blocks that straddle chunk boundaries still give every ordinal its own row; past
    the end, a negative ordinal or another batch give None."""
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    writer = store.writer(7, ["name", "email"])
    at = 0
    for n in (1, ROWS_PER_CHUNK - 1, ROWS_PER_CHUNK + 5, 3, 2 * ROWS_PER_CHUNK, 17):
        writer.write(at, block(at, n), n)
        at += n
    writer.finish()
    writer.commit()
    assert store.row_count(7) == at
    for ordinal in [0, 1, ROWS_PER_CHUNK - 1, ROWS_PER_CHUNK, at - 1,
                    *random.Random(1).sample(range(at), 50)]:
        assert store.lookup(7, ordinal) == {"name": f"n{ordinal}",
                                            "email": f"e{ordinal}@x.example"}
    assert store.lookup(7, at) is None
    assert store.lookup(7, -1) is None
    assert store.lookup(8, 0) is None
    sealed = store._reader(7)
    sizes = [sealed.chunk(i).num_rows for i in range(-(-at // ROWS_PER_CHUNK))]
    assert sizes[:-1] == [ROWS_PER_CHUNK] * (len(sizes) - 1), "fixed-size chunks"
    raw = store.path_of(7).read_bytes()
    assert b"x.example" not in raw and b"n1234" not in raw, "sealed at rest"
    store.close()


def test_rows_out_of_order_and_discard(tmp_path: Path) -> None:
    """A gap in ordinals is a programming error; a discarded writer leaves no file."""
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    writer = store.writer(1, ["name", "email"])
    writer.write(0, block(0, 3), 3)
    with pytest.raises(ValueError, match="out of order"):
        writer.write(5, block(5, 1), 1)
    writer.discard()
    assert list((tmp_path / "rows").iterdir()) == []


def test_links_in_the_purl_file_lead_to_their_own_rows(config, tmp_path: Path) -> None:
    """Every link token in a PURL file decodes to an ordinal whose stored row is that
    PURL line's data, also when rows with errors sit between them."""
    harness: Harness = make_harness(config, tmp_path)
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    harness.processor.rows = store
    lines = ["first_name,email,city"] + [  # every 7th row lacks a field: a row error
        f"A{i},a{i}@x.example,C{i}" if i % 7 else f"A{i},a{i}@x.example" for i in range(30)]
    path = harness.write("acme_agreed_20261127_101500.csv", ("\n".join(lines) + "\n").encode())
    outcome = harness.run(path, project="agreed")
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    rows = read_csv(outcome.purl)  # type: ignore[arg-type]
    header, body = rows[0], rows[1:]
    assert len(body) == 25
    for values in body:
        token = values[-1].rsplit("/", 1)[1]
        batch_id, ordinal = decode(KEY, token)  # type: ignore[misc]
        assert batch_id == outcome.batch.id
        assert store.lookup(batch_id, ordinal) == dict(zip(header[:-2], values[:-2],
                                                           strict=True))


def test_a_batch_failing_mid_stream_leaves_no_row_data(config, tmp_path: Path) -> None:
    """A batch that fails after rows went to the store (a late non-UTF-8 byte in a
    project that agreed on UTF-8) publishes no row data and leaves no temp file."""
    harness = make_harness(config, tmp_path)
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    harness.processor.rows = store
    body = "".join(f"n{i};e{i}@x.example\n" for i in range(40_000)).encode()
    path = harness.write("acme_strict_20261127_101500.csv",
                         b"name;email\n" + body + b"late;\xe9\n")
    outcome = harness.run(path, project="strict")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-encoding"
    assert list((tmp_path / "rows").iterdir()) == []


def _one_batch(store: ArrowRowStore, batch_id: int = 7, rows: int = 3) -> None:
    writer = store.writer(batch_id, ["name", "email"])
    writer.write(0, block(0, rows), rows)
    writer.commit()


def test_another_key_a_changed_byte_or_a_moved_file_opens_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file read with another key, with one byte of a chunk changed, or copied under
    another batch's name (the chunk is bound to its batch and place) gives no row, and
    one ERROR line that says so without any value."""
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    _one_batch(store)
    assert store.lookup(7, 2) == {"name": "n2", "email": "e2@x.example"}
    other = ArrowRowStore(tmp_path / "rows", key=bytes(32))
    assert other.lookup(7, 2) is None
    assert "does not open with the region's rows key" in caplog.text
    (tmp_path / "rows" / "batch-8.rows").write_bytes(store.path_of(7).read_bytes())
    assert store.lookup(8, 0) is None, "moved to another batch"
    raw = bytearray(store.path_of(7).read_bytes())
    raw[20] ^= 1  # inside the first chunk's ciphertext
    store.path_of(7).write_bytes(bytes(raw))
    fresh = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY)
    assert fresh.lookup(7, 0) is None
    assert "e2@x.example" not in caplog.text and "n2" not in caplog.text


def test_only_the_kept_columns_are_stored(tmp_path: Path) -> None:
    """The store keeps what ``keep`` says of each project's rows; with no column kept,
    it still knows the row count (a link past the end is not a row)."""
    kept = {("acme", "spring"): ["name"], ("acme", "none"): []}
    store = ArrowRowStore(tmp_path / "rows", key=ROWS_KEY,
                          keep=lambda client, project, columns: [
                              c for c in columns if c in kept[client, project]])
    writer = store.writer(1, ["name", "email"], client="acme", project="spring")
    writer.write(0, block(0, 5), 5)
    writer.commit()
    assert store.lookup(1, 4) == {"name": "n4"}
    writer = store.writer(2, ["name", "email"], client="acme", project="none")
    writer.write(0, block(0, 5), 5)
    writer.commit()
    assert (store.lookup(2, 4), store.lookup(2, 5), store.row_count(2)) == ({}, None, 5)


def test_the_previous_release_plaintext_files_are_read_then_sealed(tmp_path: Path) -> None:
    """A batch-<id>.arrow of the previous release answers as before until
    ``encrypt_legacy`` seals it, chunk by chunk, into batch-<id>.rows; the plaintext
    file is gone afterwards, and every row still answers."""
    root = tmp_path / "rows"
    root.mkdir()
    rows = ROWS_PER_CHUNK + 10
    table = pa.table(block(0, rows))
    with pa.OSFile(str(root / "batch-3.arrow"), "w") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ROWS_PER_CHUNK)
    store = ArrowRowStore(root, key=ROWS_KEY)
    assert store.lookup(3, rows - 1) == {"name": f"n{rows - 1}",
                                         "email": f"e{rows - 1}@x.example"}
    assert store.encrypt_legacy() == 1
    assert sorted(p.name for p in root.iterdir()) == ["batch-3.rows"]
    assert b"x.example" not in (root / "batch-3.rows").read_bytes()
    for ordinal in (0, ROWS_PER_CHUNK, rows - 1):
        assert store.lookup(3, ordinal) == {"name": f"n{ordinal}",
                                            "email": f"e{ordinal}@x.example"}
    assert store.row_count(3) == rows and store.batch_ids() == [3]
    assert store.encrypt_legacy() == 0


def test_a_region_keeps_what_its_templates_read(tmp_path: Path) -> None:
    """Built from the configuration: a project on the bundled template keeps only the
    greeting's name-like column; one listing keep_columns keeps those; a template that
    loops over the row keeps every column; the rows key is made once, 0600."""
    looping = tmp_path / "looping"
    looping.mkdir()
    (looping / "landing.html").write_text("{% for k, v in row.items() %}{{ v }}{% endfor %}")
    (looping / "template.toml").write_text("")
    text = region_toml() + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.projects.spring]
[clients.acme.projects.listed]
render = {{ keep_columns = ["email"] }}
[clients.acme.projects.looping]
render = {{ template = "{looping}" }}
"""
    region = build_region(parse_config(text), "usa", data_dir=tmp_path / "state")
    try:
        header = ["First Name", "email", "city"]
        for project, expected in (("spring", ["First Name"]), ("listed", ["email"]),
                                  ("looping", header)):
            writer = region.rows.writer(1, header, client="acme", project=project)
            assert writer._schema.names == expected, project
            writer.discard()
        key_file = tmp_path / "state" / "rows.key"
        assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text()) == 65
    finally:
        region.close()
