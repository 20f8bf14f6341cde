"""The rows of one batch streamed into its PURL file: each block of rows read, checked
(required values, field counts), rendered (links, the row store), and written; the
PURL file is published only if every block went through. Flat memory: a few blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from purlgate.core import dialect as dia
from purlgate.core.errorlog import ErrorLog, RowError, bad_row_error
from purlgate.core.files import AtomicFile, Digest
from purlgate.core.lifecycle import Counts
from purlgate.core.render import Renderer, RenderRequest, RowSink, RowStore
from purlgate.core.table import BadRow, LineWriter, RecordNumbers, RowReader, text
from purlgate.errors import CutOffError, NoDataError
from purlgate.faults import crash_point

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Target:
    """Where a batch's rows go and how it was read."""

    path: Path  # the PURL file (or its plain scratch copy when results are encrypted)
    mode: int
    replace: bool  # a restarted batch may replace its own earlier output
    batch_id: int
    renderer: Renderer
    rows: RowStore | None
    owner: tuple[str, str] = ("", "")  # the batch's client and project
    digest: Digest | None = None  # fed the file's bytes as they are written (its SHA-256)


def transform(source: Path, dialect: dia.Dialect, plan: dia.ColumnPlan, *,
              delimiter: str | None, encoding: str | None, target: Target, errors: ErrorLog,
              progress: Progress | None) -> Counts:
    """Stream rows into ``target``; publish it only if every block went through."""
    header = dialect.header
    read = sorted(set(plan.output) | set(plan.required))
    where = {col: i for i, col in enumerate(read)}
    out_names = [header[i] for i in plan.output]
    reader = RowReader(source, dialect, read)
    numbers = reader.numbers
    with AtomicFile(target.path, no_clobber=not target.replace, mode=target.mode) as out, \
            contextlib.ExitStack() as stack:
        sink: RowSink | None = None
        if target.rows is not None and target.renderer.keeps_rows:
            client, project = target.owner
            sink = target.rows.writer(target.batch_id, out_names, client=client,
                                      project=project)
            stack.callback(sink.discard)  # a no-op once committed
        writer = LineWriter(out.file, delimiter=delimiter or dialect.delimiter,
                            eol=dialect.eol, encoding=encoding or dialect.encoding,
                            header=[*out_names, *dia.LINK_COLUMNS], digest=target.digest)
        stack.callback(writer.close)  # the writer thread ends on every path
        state = _Pass(plan, where, out_names, header, numbers, target, sink, writer)
        for columns in reader:
            found = _block(state, columns)
            n = len(columns[0])
            last = numbers.record_of(n - 1) if n else None
            found += [bad_row_error(b, len(header))
                      for b in numbers.take_bad_rows(up_to=last)]
            numbers.advance(n)
            errors.add_rows(found)
            if progress is not None:
                progress(reader.position(), reader.size)
        tail = numbers.take_bad_rows()
        _refuse_cut_off(source, tail, numbers.last, len(header))
        errors.add_rows(bad_row_error(b, len(header)) for b in tail)
        if state.ok == 0:
            raise NoDataError(
                "no row could be used: every data row has an error (see the error list)"
            )
        if sink is not None:
            sink.finish()  # its flush and fsync overlap the PURL file's
        writer.close()
        out.commit()
        if sink is not None:
            sink.commit()  # before the batch is Done: every delivered link finds its row
    return Counts(state.ok + errors.rows_with_errors, state.ok, errors.rows_with_errors)


@dataclass
class _Pass:
    """One pass over the file: what every block needs, and the running counts."""

    plan: dia.ColumnPlan
    where: Mapping[int, int]  # column index in the file -> position in a block
    out_names: list[str]
    header: Sequence[str]
    numbers: RecordNumbers
    target: Target
    sink: RowSink | None
    writer: LineWriter
    rendered: int = 0  # ordinal of the next row handed to the renderer (token input)
    ok: int = 0  # rows written to the PURL file


def _block(state: _Pass, columns: Sequence[pa.Array]) -> list[RowError]:
    """One block of rows: the rows with an empty required value set aside, the rest
    rendered, stored and written; the row errors found."""
    plan, where, numbers, target = state.plan, state.where, state.numbers, state.target
    header, out_names, sink = state.header, state.out_names, state.sink
    found: list[RowError] = []
    data = [columns[where[i]] for i in plan.output]
    kept: pa.Array | None = None  # block positions of the rows still in ``data``
    empty = _empty_required(columns, plan, where)
    if empty:
        bad = None
        for col, mask in empty.items():
            bad = mask if bad is None else pc.or_(bad, mask)
            found += [RowError(numbers.record_of(p) + 1, header[col], "required value is empty")
                      for p in pc.indices_nonzero(mask).to_pylist()]
        keep = pc.invert(bad)
        kept = pc.indices_nonzero(keep)
        data = [pc.filter(c, keep) for c in data]
    m = len(data[0]) if data else 0
    if not m:
        return found
    named = dict(zip(out_names, data, strict=True))
    if sink is not None:
        sink.write(state.rendered, named, m)
    result = target.renderer.render(RenderRequest(
        batch_id=target.batch_id, first_index=state.rendered, columns=named, num_rows=m))
    state.rendered += m
    links = [result.thumbnails, result.landing_pages]
    if result.failures:
        for p, reason in result.failures.items():
            at = p if kept is None else kept[p].as_py()
            found.append(RowError(numbers.record_of(at) + 1, "", reason))
        good = pa.array([i not in result.failures for i in range(m)])
        data = [pc.filter(c, good) for c in data]
        links = [pc.filter(c, good) for c in links]
    state.writer.write([*data, *links])
    state.ok += len(links[0])
    crash_point("batch-running")
    return found


def _empty_required(
    columns: Sequence[pa.Array], plan: dia.ColumnPlan, where: Mapping[int, int]
) -> dict[int, pa.Array]:
    """Per required column with an empty (or blank) value in this block: its mask."""
    empty: dict[int, pa.Array] = {}
    for col in plan.required:
        mask = pc.equal(pc.utf8_trim_whitespace(columns[where[col]]), text(""))
        if pc.any(mask).as_py():
            empty[col] = mask
    return empty


def _refuse_cut_off(path: Path, tail: Sequence[BadRow], last_good: int, width: int) -> None:
    """A transfer cut short ends mid-row: the last record is short and has no line end.
    Such a file is refused whole (rather than processed as if complete)."""
    if not tail or tail[-1].record <= last_good or tail[-1].fields >= width:
        return
    with path.open("rb") as f:
        f.seek(-1, 2)
        if f.read(1) in (b"\n", b"\r"):
            return
    last = tail[-1]
    raise CutOffError(
        f"the file looks cut off at row {last.record + 1}: its last line has {last.fields} "
        f"of the {width} fields and no line end, as when an upload or a copy stops early; "
        "send the whole file again"
    )
