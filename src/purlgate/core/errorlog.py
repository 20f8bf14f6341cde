"""A batch's errors: row errors streamed to a scratch file as they are found, the
batch's own errors kept aside, published as the error file (``row,column,reason``)."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purlgate.core.files import RESULT_MODE, AtomicFile, private_file
from purlgate.core.table import BadRow


@dataclass(frozen=True)
class RowError:
    row: int  # as a spreadsheet shows it: the header is row 1
    column: str
    reason: str
    swallowed: int = 0  # further lines of the file this one error stands for


def bad_row_error(bad: BadRow, width: int) -> RowError:
    """A row with the wrong field count; one that a stray quote ran over several lines is
    said so, and every line it swallowed counts, so counts add up to the lines sent."""
    row = bad.record + 1
    if bad.lines == 1:
        return RowError(row, "", f"has {bad.fields} fields, the header has {width}")
    last = row + bad.lines - 1
    if bad.quote_open:
        reason = (f"row {row} opens a quote that never closes: lines {row} to {last} (the "
                  f"end of the file) became one row of {bad.fields} fields, the header has "
                  f"{width}; check the quotes")
    else:
        reason = (f"row {row} opens a quote that closes in line {last}: lines {row} to "
                  f"{last} became one row of {bad.fields} fields, the header has {width}; "
                  "check the quotes")
    return RowError(row, "", reason, swallowed=bad.lines - 1)


class ErrorLog:
    """Row errors streamed to a scratch file; the batch's own errors kept aside."""

    HEADER = ("row", "column", "reason")

    def __init__(self, scratch: Path) -> None:
        self._path = scratch
        # Made at the first row error: most files have none.
        self._file: io.TextIOWrapper | None = None
        self._writer: Any = None
        self.rows_with_errors = 0
        self.batch_errors: list[str] = []

    def reset(self) -> None:
        """Forget row errors (the file is being read again from the start)."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self.rows_with_errors = 0

    def add_rows(self, errors: Iterable[RowError]) -> None:
        last = None
        for e in sorted(errors, key=lambda e: e.row):
            if self._file is None:
                self._file = io.TextIOWrapper(private_file(self._path), encoding="utf-8",
                                              newline="")
                self._writer = csv.writer(self._file, lineterminator="\n")
            self._writer.writerow((e.row, e.column, e.reason))
            if e.row != last:
                self.rows_with_errors += 1 + e.swallowed
                last = e.row

    @property
    def empty(self) -> bool:
        return not self.rows_with_errors and not self.batch_errors

    def publish(self, final: Path, *, replace: bool = False, mode: int = RESULT_MODE) -> Path:
        self.close()
        with AtomicFile(final, no_clobber=not replace, mode=mode) as out:
            text = io.TextIOWrapper(out.file, encoding="utf-8", newline="", write_through=True)
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(self.HEADER)
            for reason in self.batch_errors:
                writer.writerow(("", "", reason))
            if self._file is not None:
                with self._path.open("r", encoding="utf-8", newline="") as rows:
                    shutil.copyfileobj(rows, text)
            text.flush()
            text.detach()
            return out.commit()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
