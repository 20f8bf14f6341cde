"""The row store: what the core writes per render block is what the web side reads."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from purlgate.core.lifecycle import BatchState
from purlgate.renderers.embedded import decode
from purlgate.rowstore import ROWS_PER_CHUNK, ArrowRowStore
from tests.conftest import KEY, Harness, make_harness, read_csv


def block(start: int, n: int) -> dict[str, pa.Array]:
    return {"name": pa.array([f"n{i}" for i in range(start, start + n)]),
            "email": pa.array([f"e{i}@x.example" for i in range(start, start + n)])}


def test_blocks_of_any_size_are_found_by_ordinal(tmp_path: Path) -> None:
    """Blocks that straddle chunk boundaries still give every ordinal its own row; past
    the end, a negative ordinal or another batch give None."""
    store = ArrowRowStore(tmp_path / "rows")
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
    with store.path_of(7).open("rb") as f:
        reader = pa.ipc.open_file(f)
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    assert sizes[:-1] == [ROWS_PER_CHUNK] * (len(sizes) - 1), "fixed-size chunks"
    store.close()


def test_rows_out_of_order_and_discard(tmp_path: Path) -> None:
    """A gap in ordinals is a programming error; a discarded writer leaves no file."""
    store = ArrowRowStore(tmp_path / "rows")
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
    store = ArrowRowStore(tmp_path / "rows")
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
    store = ArrowRowStore(tmp_path / "rows")
    harness.processor.rows = store
    body = "".join(f"n{i};e{i}@x.example\n" for i in range(40_000)).encode()
    path = harness.write("acme_strict_20261127_101500.csv",
                         b"name;email\n" + body + b"late;\xe9\n")
    outcome = harness.run(path, project="strict")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-encoding"
    assert list((tmp_path / "rows").iterdir()) == []
