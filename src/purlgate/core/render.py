"""The render seam: each valid row gets its ``thumbnail_1`` and ``landingPage`` links.

A renderer works on a block of rows at once (Arrow string columns), so a backend that
needs no per-row Python work (the embedded one) stays vectorised, and an HTTP backend
can batch its calls. A row the backend cannot render is reported in ``failures`` and
becomes a row error; the rest of the block goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa


@dataclass(frozen=True)
class RenderRequest:
    batch_id: int
    first_index: int  # ordinal of the block's first row among the batch's rendered rows
    columns: Mapping[str, pa.Array]  # header name -> values, the PURL file's data columns
    num_rows: int


@dataclass(frozen=True)
class RenderResult:
    thumbnails: pa.Array
    landing_pages: pa.Array
    failures: Mapping[int, str] = field(default_factory=dict)  # row position -> reason


class Renderer(Protocol):
    # Its links point at our own web side, which needs the rows (the row store).
    keeps_rows: bool
    # Each render costs money: the file's encoding is settled before the first call,
    # so a file is never read (and rendered) twice.
    paid: bool

    def render(self, request: RenderRequest) -> RenderResult: ...


@dataclass(frozen=True)
class RowState:
    """A paid render's progress for one row (the render API's ledger)."""

    state: str  # "requested", "done", "failed"
    check_url: str | None
    thumbnail: str | None
    landing_page: str | None
    reason: str | None


class RenderLedgerPort(Protocol):
    """What a paid renderer asked and was answered, per (batch, ordinal): kept where
    every instance of the region finds it, so a row is paid for once."""

    def load(self, batch_id: int, first: int, count: int) -> dict[int, RowState]: ...

    def record(self, batch_id: int, ordinal: int, row: RowState) -> None: ...

    def forget(self, batch_id: int) -> None: ...

    def close(self) -> None: ...


class RowSink(Protocol):
    """Takes one batch's rendered rows in ordinal order; published with the PURL file."""

    def write(self, first_index: int, columns: Mapping[str, pa.Array],
              num_rows: int) -> None: ...

    def finish(self) -> None: ...  # no more rows; may start the final flush

    def commit(self) -> None: ...

    def discard(self) -> None: ...


class RowStore(Protocol):
    """Where the web side finds a row by (batch id, ordinal): the core only writes."""

    def writer(self, batch_id: int, columns: Sequence[str], *, client: str,
               project: str) -> RowSink:
        """Where a batch's rows go; the store keeps what the project's pages read."""
        ...

    def delete(self, batch_id: int) -> bool: ...
