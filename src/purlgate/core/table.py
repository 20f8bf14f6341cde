"""Stream rows in and PURL lines out, a block at a time, without per-row Python work.

Reading uses Arrow's streaming CSV reader (quotes, doubled quotes and newlines inside
values; a row with the wrong field count is handed to ``_on_invalid`` and skipped).
Writing builds each output line with Arrow string kernels: a column is quoted only
when its block contains the delimiter, a quote, CR or LF (the rule of the stdlib
``csv`` module's QUOTE_MINIMAL, so output matches what Python or Excel would write),
then one join per block produces the bytes that go to disk.
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from purlgate.core.dialect import Dialect
from purlgate.core.files import BackgroundWriter, Digest
from purlgate.errors import EncodingError, InvalidUtf8Error

BLOCK_SIZE = 1 << 20


@functools.cache
def text(value: str) -> pa.Scalar:
    """A string as an Arrow scalar, for a kernel's argument. A bare Python ``str`` is
    converted on every call through Arrow's type inference, which tries to import
    dateutil each time (a search of sys.path when it is not installed: 75 us a call).
    Made at first use, not at import: a scalar made then initializes Arrow's default
    pool (mimalloc, 5 MB in each process) before ``region.use_system_allocator`` runs.
    The strings are a project's few delimiters, line ends and suffixes."""
    return pa.scalar(value, pa.string())


@dataclass(frozen=True)
class BadRow:
    record: int  # 1 = first data row after the header
    fields: int
    lines: int = 1  # lines of the file it spans (more than one: a quote ran on)
    quote_open: bool = False  # a quote opened in it never closed (the file ended)


class RecordNumbers:
    """Map the n-th delivered row back to its record number, around skipped rows.

    Arrow numbers the rows it skips, not the rows it delivers; we keep only the skipped
    numbers not yet passed, so memory stays flat however many rows are bad.
    """

    def __init__(self) -> None:
        self._pending: list[int] = []  # skipped record numbers after ``_last``
        self._last = 0  # record number of the last delivered row
        self.bad_rows: list[BadRow] = []  # skipped since the last ``take_bad_rows``

    def skipped(self, record: int, fields: int, text: str = "") -> None:
        bisect.insort(self._pending, record)
        self.bad_rows.append(BadRow(record, fields, text.count("\n") + 1,
                                    text.count('"') % 2 == 1))

    def record_of(self, position: int) -> int:
        """Record number of the delivered row ``position`` places after the last one."""
        record = self._last + position + 1
        while True:
            moved = self._last + position + 1 + bisect.bisect_right(self._pending, record)
            if moved == record:
                return record
            record = moved

    @property
    def last(self) -> int:
        """Record number of the last row delivered so far (0: none yet)."""
        return self._last

    def advance(self, delivered: int) -> None:
        if delivered:
            self._last = self.record_of(delivered - 1)
            del self._pending[: bisect.bisect_right(self._pending, self._last)]

    def take_bad_rows(self, up_to: int | None = None) -> list[BadRow]:
        """Bad rows numbered up to ``up_to`` (all when None), in order."""
        rows = sorted(self.bad_rows, key=lambda r: r.record)
        if up_to is None:
            self.bad_rows = []
            return rows
        keep = [r for r in rows if r.record > up_to]
        self.bad_rows = keep
        return [r for r in rows if r.record <= up_to]


class RowReader:
    """Iterate the data rows of ``path`` as Arrow batches of string columns."""

    def __init__(self, path: Path, dialect: Dialect, columns: Sequence[int]) -> None:
        self.dialect = dialect
        self.numbers = RecordNumbers()
        self.size = path.stat().st_size
        self._file = pa.OSFile(str(path))
        self._file.seek(dialect.data_offset)
        names = [f"c{i}" for i in range(len(dialect.header))]
        self._columns = [names[i] for i in columns]
        self._width = len(names)
        read = pacsv.ReadOptions(
            column_names=names,
            block_size=BLOCK_SIZE,
            # Serial parsing numbers the rows it skips (threaded parsing does not), and
            # measured faster on this streaming path anyway.
            use_threads=False,
            encoding="cp1252" if dialect.codec == "cp1252" else "utf8",
        )
        parse = pacsv.ParseOptions(
            delimiter=dialect.delimiter,
            quote_char='"',
            double_quote=True,
            escape_char=False,
            newlines_in_values=True,
            # Arrow would turn a blank line into a row of empty values; blank lines are
            # skipped instead, and so are not counted in row numbers.
            ignore_empty_lines=True,
            invalid_row_handler=self._on_invalid,
        )
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()),
            include_columns=self._columns,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            check_utf8=True,
        )
        try:
            self._reader = pacsv.open_csv(
                self._file, read_options=read, parse_options=parse, convert_options=convert
            )
        except pa.ArrowInvalid as exc:
            self._file.close()
            raise _translate(exc) from exc
        except BaseException:
            self._file.close()
            raise

    def _on_invalid(self, row: Any) -> str:
        self.numbers.skipped(int(row.number), int(row.actual_columns), str(row.text or ""))
        return "skip"

    def position(self) -> int:
        return int(self._file.tell())

    def __iter__(self) -> Iterator[list[pa.Array]]:
        try:
            while True:
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as exc:
                    raise _translate(exc) from exc
                yield [batch.column(name) for name in self._columns]
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()


def _translate(exc: Exception) -> Exception:
    text = str(exc)
    if "utf8" in text.lower() and "invalid" in text.lower():
        return InvalidUtf8Error(text)
    if "Unicode" in text or "codec" in text:
        return EncodingError("the file has bytes that are not Windows-1252 text")
    return EncodingError(
        "the file could not be read as delimited text (an unclosed quote?); "
        "check the quoting of the values and send it again"
    )


def _with_suffix(column: pa.Array, suffix: str) -> pa.Array:
    """``column`` with ``suffix`` appended to every value.

    Fixed-width columns (the embedded renderer's links) take a numpy fast path that
    costs a fraction of a string-join kernel; anything else uses the kernel.
    """
    n = len(column)
    _, offsets, data = column.buffers()
    if column.null_count == 0 and data is not None and n > 0:
        ends = np.frombuffer(offsets, dtype=np.int32, count=n + 1, offset=column.offset * 4)
        width = int(ends[1] - ends[0])
        if width > 0 and int(ends[-1] - ends[0]) == width * n and (np.diff(ends) == width).all():
            values = np.frombuffer(data, dtype=np.uint8)[ends[0] : ends[-1]].reshape(n, width)
            tail = np.frombuffer(suffix.encode(), dtype=np.uint8)
            out = np.empty((n, width + len(tail)), dtype=np.uint8)
            out[:, :width] = values
            out[:, width:] = tail
            step = width + len(tail)
            new_offsets = np.arange(0, step * n + 1, step, dtype=np.int32)
            return pa.Array.from_buffers(
                pa.string(), n, [None, pa.py_buffer(new_offsets), pa.py_buffer(out)]
            )
    return pc.binary_join_element_wise(column, text(suffix), text(""))


class LineWriter:
    """Write header and rows in the output dialect to an open binary file.

    Writes go through a background thread; ``close()`` must be called (and succeed)
    before the file is flushed and published.
    """

    def __init__(
        self, out: BinaryIO, *, delimiter: str, eol: str, encoding: str, header: Sequence[str],
        digest: Digest | None = None,
    ) -> None:
        self._out = BackgroundWriter(out, digest=digest)
        self._delimiter = delimiter
        self._eol = eol
        self._codec = "cp1252" if encoding == "windows-1252" else "utf-8"
        self._specials = tuple(s.encode() for s in (delimiter, '"', "\r", "\n"))
        self._pattern = "[" + re.escape(delimiter + '"') + r"\r\n]"
        if encoding == "utf-8-sig":
            self._out.write(b"\xef\xbb\xbf")
        text = io.StringIO()
        csv.writer(text, delimiter=delimiter, lineterminator=eol).writerow(header)
        self._write_text(text.getvalue())

    def _write_text(self, text: str) -> None:
        try:
            self._out.write(text.encode(self._codec))
        except UnicodeEncodeError as exc:
            raise EncodingError(
                "a value has characters that Windows-1252 cannot hold, and the project "
                "fixes the output encoding to Windows-1252"
            ) from exc

    def _quoted(self, column: pa.Array) -> pa.Array:
        data = column.buffers()[2]
        if data is None:
            return column
        raw = data.to_pybytes()  # one copy; `in` on bytes is memchr-fast
        present = [s for s in self._specials if s in raw]
        if not present:
            return column
        if len(present) == 1:
            mask = pc.match_substring(column, present[0].decode())
        else:
            mask = pc.match_substring_regex(column, self._pattern)
        doubled = pc.replace_substring(column, '"', '""') if b'"' in present else column
        quoted = pc.binary_join_element_wise(text('"'), doubled, text('"'), text(""))
        if pc.all(mask).as_py():
            return quoted
        return pc.if_else(mask, quoted, column)

    def write(self, columns: Sequence[pa.Array]) -> None:
        if len(columns[0]) == 0:
            return
        parts = [self._quoted(c) for c in columns]
        parts[-1] = _with_suffix(parts[-1], self._eol)
        lines = pc.binary_join_element_wise(*parts, text(self._delimiter))
        _, offsets, data = lines.buffers()
        start = lines.offset
        view = memoryview(offsets).cast("i")  # int32 offsets of a string array
        body = memoryview(data)[view[start] : view[start + len(lines)]]
        if self._codec == "utf-8":
            self._out.write(body)
        else:
            self._write_text(bytes(body).decode("utf-8"))

    def close(self) -> None:
        self._out.close()
