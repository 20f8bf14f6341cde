"""Per-batch row data for the web side: one Arrow IPC file per batch, read by ordinal.

The core's streaming pass hands every block it renders to a ``RowWriter`` (the core's
``RowSink`` port), so the file is never read a second time. The writer cuts the rows
into record batches of exactly ``ROWS_PER_CHUNK`` rows: row ``n`` (the render ordinal
inside the link's token) is row ``n % ROWS_PER_CHUNK`` of record batch
``n // ROWS_PER_CHUNK``, found through the file footer on a memory map, in O(1).

Files are ``<root>/batch-<id>.arrow``, mode 0600 (row data is the client's PII), written
as a hidden ``.part`` and renamed only when the batch's PURL file is published: a
failed or interrupted batch leaves no row data behind. The web side only reads; the
retention sweep deletes a batch's file with its links. Never imports the web side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from purlgate.core.files import fsync_dir
from purlgate.errors import StorageError

log = logging.getLogger("purlgate.rows")

ROWS_PER_CHUNK = 8192
OPEN_READERS = 64  # memory maps kept open for lookups (LRU)
# LZ4 frames: a third of the bytes for typical rows, which is what the disk pays for;
# a lookup decompresses one chunk (a few hundred KiB) in well under a millisecond.
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_NAME = re.compile(r"^batch-(\d+)\.arrow$")


class RowWriter:
    """Streams one batch's rows into ``.batch-<id>.arrow.part``; ``commit`` publishes.

    Once a batch has a chunk's worth of rows, the encoding and writing run on a thread
    of their own (Arrow releases the GIL), so they overlap the core's next block instead
    of adding to it, and ``finish`` starts the final flush and fsync early, so that it
    overlaps the PURL file's own. A smaller batch (the usual twenty rows) is written at
    ``commit`` where it is: a thread would cost it more than it saves.
    """

    def __init__(self, final: Path, columns: Sequence[str], depth: int = 2) -> None:
        self.final = final
        self.temp = final.with_name(f".{final.name}.part")
        self._schema = pa.schema([pa.field(name, pa.string()) for name in columns])
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._next_index = 0
        try:
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            self._sink = pa.OSFile(str(self.temp), "w")
        except OSError as exc:
            raise StorageError(f"cannot create {self.temp.name}: {exc.strerror}") from exc
        self._writer = pa.ipc.new_file(self._sink, self._schema, options=WRITE_OPTIONS)
        self._queue: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None  # started at a chunk's worth of rows
        self._finished = False
        self.committed = False

    def write(self, first_index: int, columns: Mapping[str, pa.Array], num_rows: int) -> None:
        """Append rows ``first_index ..``; blocks arrive in ordinal order, without gaps."""
        if first_index != self._next_index:
            raise ValueError(f"rows out of order: {first_index}, expected {self._next_index}")
        self._raise()
        arrays = [columns[f.name] for f in self._schema]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        if self._thread is None and self._pending_rows + batch.num_rows < ROWS_PER_CHUNK:
            self._pending.append(batch)  # kept here; the thread takes them over if it starts
            self._pending_rows += batch.num_rows
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="row-writer",
                                                daemon=True)
                self._thread.start()
            self._queue.put(batch)
        self._next_index += num_rows

    def _run(self) -> None:
        try:
            while (batch := self._queue.get()) is not None:
                self._pending.append(batch)
                self._pending_rows += batch.num_rows
                if self._pending_rows >= ROWS_PER_CHUNK:
                    self._flush(final=False)
            self._close_and_sync()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
            while self._queue.get() is not None:  # unblock a producer, then stop
                pass

    def _close_and_sync(self) -> None:
        if self._pending_rows:
            self._flush(final=True)
        self._writer.close()
        self._sink.close()
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _flush(self, *, final: bool) -> None:
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        at = 0
        while table.num_rows - at >= ROWS_PER_CHUNK or (final and at < table.num_rows):
            piece = table.slice(at, ROWS_PER_CHUNK)
            if piece.num_columns and piece.column(0).num_chunks > 1:
                piece = piece.combine_chunks()  # a chunk across two blocks: one copy
            self._writer.write_table(piece, max_chunksize=ROWS_PER_CHUNK)
            at += piece.num_rows
        rest = table.slice(at)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _raise(self) -> None:
        if self._error is not None:
            if isinstance(self._error, OSError):
                raise StorageError(f"cannot write {self.temp.name}: {self._error.strerror}")
            raise self._error

    def finish(self) -> None:
        """No more rows: flush and fsync in the background (``commit`` waits for it)."""
        if not self._finished:
            self._finished = True
            if self._thread is not None:
                self._queue.put(None)

    def commit(self) -> None:
        self.finish()
        if self._thread is not None:
            self._thread.join()
        elif self._error is None:
            try:
                self._close_and_sync()
            except OSError as exc:  # raised below as the storage fault it is
                self._error = exc
        self._raise()
        try:
            self.temp.replace(self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            raise StorageError(f"cannot publish {self.final.name}: {exc.strerror}") from exc
        self.committed = True

    def discard(self) -> None:
        if self.committed:
            return
        self.finish()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):  # already closed by the thread
            self._writer.close()
        with contextlib.suppress(Exception):
            self._sink.close()
        self.temp.unlink(missing_ok=True)


class ArrowRowStore:
    """The region's row data: writers for the core, lookups for the web side."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._lock = threading.Lock()
        # batch id -> (memory map, reader, row count: known at open, so that a row past
        # the end costs no chunk decompression, as much as any other link that is not)
        self._readers: OrderedDict[int, tuple[Any, Any, int]] = OrderedDict()

    def path_of(self, batch_id: int) -> Path:
        return self.root / f"batch-{batch_id}.arrow"

    def writer(self, batch_id: int, columns: Sequence[str]) -> RowWriter:
        self._forget(batch_id)  # a restarted batch writes its file anew
        return RowWriter(self.path_of(batch_id), columns)

    def _reader(self, batch_id: int) -> tuple[Any, int] | None:
        """(reader, row count) of a batch's file, or None."""
        with self._lock:
            hit = self._readers.get(batch_id)
            if hit is not None:
                self._readers.move_to_end(batch_id)
                return hit[1], hit[2]
        try:
            source = pa.memory_map(str(self.path_of(batch_id)), "r")
        except FileNotFoundError:
            return None
        try:
            reader = pa.ipc.open_file(source)
            last = reader.num_record_batches - 1
            count = last * ROWS_PER_CHUNK + reader.get_batch(last).num_rows if last >= 0 else 0
        except (pa.ArrowInvalid, OSError):
            source.close()
            log.exception("row data of batch %d is unreadable", batch_id)
            return None
        with self._lock:
            self._readers[batch_id] = (source, reader, int(count))
            while len(self._readers) > OPEN_READERS:
                _, (old, _, _) = self._readers.popitem(last=False)
                old.close()
        return reader, int(count)

    def lookup(self, batch_id: int, ordinal: int) -> dict[str, str] | None:
        """The row's values by column name, or None if the batch or row is not here."""
        found = self._reader(batch_id)
        if found is None or not 0 <= ordinal < found[1]:
            return None
        chunk, at = divmod(ordinal, ROWS_PER_CHUNK)
        batch = found[0].get_batch(chunk)
        return {name: batch.column(i)[at].as_py()
                for i, name in enumerate(batch.schema.names)}

    def row_count(self, batch_id: int) -> int:
        found = self._reader(batch_id)
        return 0 if found is None else found[1]

    def _forget(self, batch_id: int) -> None:
        with self._lock:
            hit = self._readers.pop(batch_id, None)
        if hit is not None:
            hit[0].close()

    def delete(self, batch_id: int) -> bool:
        """Remove a batch's row data (retention); True if there was any."""
        self._forget(batch_id)
        try:
            self.path_of(batch_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def batch_ids(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := _NAME.match(p.name)))

    def close(self) -> None:
        with self._lock:
            readers, self._readers = list(self._readers.values()), OrderedDict()
        for source, _, _ in readers:
            source.close()
