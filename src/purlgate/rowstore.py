"""Per-batch row data for the web side, encrypted at rest, read by ordinal.

The core's streaming pass hands every block it renders to a ``RowWriter`` (the core's
``RowSink`` port), so the file is never read a second time. Only the columns the
project's page and media read are kept (``renderers/columns.py``: listed in the
project's config, or read off its template: ``keep``); the rest of a row is in the client's PURL
file and nowhere here. The writer cuts the rows into chunks of exactly
``ROWS_PER_CHUNK`` rows: row ``n`` (the render ordinal inside the link's token) is row
``n % ROWS_PER_CHUNK`` of chunk ``n // ROWS_PER_CHUNK``, found through the file's index
in O(1).

A file, ``<root>/batch-<id>.rows`` (mode 0600), is ``MAGIC``, then each chunk as an
Arrow IPC stream (LZ4) sealed with AES-256-GCM under the region's rows key (a random
96-bit nonce before it; the batch id and chunk number authenticated with it, so a chunk
cannot be moved to another place or batch), then the index (offset and length of each
chunk, the row count, the chunk count) and ``MAGIC`` again. It is written as a hidden
``.part`` and renamed only when the batch's PURL file is published: a failed or
interrupted batch leaves no row data behind. The web side only reads; the retention
sweep deletes a batch's file with its links. A plaintext ``batch-<id>.arrow`` of the
previous release is still read, and ``encrypt_legacy`` converts it. Never imports the
web side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from purlgate.core.files import fsync_dir
from purlgate.errors import StorageError

log = logging.getLogger("purlgate.rows")

ROWS_PER_CHUNK = 8192
OPEN_READERS = 64  # files kept open for lookups (LRU)
DECODED_CHUNKS = 16  # chunks kept decrypted and decoded (LRU): views come in runs
# LZ4 frames: a third of the bytes for typical rows, which is what the disk pays for;
# a lookup decrypts and decompresses one chunk (a few hundred KiB) in well under a ms.
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
MAGIC = b"PGROWS1\n"
NONCE = 12
_ENTRY = struct.Struct("<QI")  # a chunk's offset and length
_TAIL = struct.Struct("<QI")  # rows, chunks (before the closing MAGIC)
_NAME = re.compile(r"^batch-(\d+)\.(rows|arrow)$")

# What to keep of a project's rows: (client, project, the row's columns) -> those kept.
Keep = Callable[[str, str, Sequence[str]], list[str]]


def _aad(batch_id: int, chunk: int) -> bytes:
    return f"purlgate-rows|{batch_id}|{chunk}".encode()


class RowWriter:
    """Streams one batch's rows into ``.batch-<id>.rows.part``; ``commit`` publishes.

    Once a batch has a chunk's worth of rows, the encoding, sealing and writing run on a
    thread of their own (Arrow and OpenSSL release the GIL), so they overlap the core's
    next block instead of adding to it, and ``finish`` starts the final flush and fsync
    early, so that it overlaps the PURL file's own. A smaller batch (the usual twenty
    rows) is written at ``commit`` where it is: a thread would cost it more than it saves.
    """

    def __init__(self, final: Path, columns: Sequence[str], *, key: bytes, batch_id: int,
                 depth: int = 2, temp: Path | None = None) -> None:
        self.final = final
        self.temp = temp or final.with_name(f".{final.name}.part")
        self._schema = pa.schema([pa.field(name, pa.string()) for name in columns])
        self._seal = AESGCM(key)
        self._batch_id = batch_id
        self._index: list[tuple[int, int]] = []
        self._rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._next_index = 0
        try:
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=1 << 20)
            self._file.write(MAGIC)
        except OSError as exc:
            raise StorageError(f"cannot create {self.temp.name}: {exc.strerror}") from exc
        self._offset = len(MAGIC)
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
        self._next_index += num_rows
        if not self._schema:  # nothing kept but the row count
            self._rows += num_rows
            return
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
        for offset, length in self._index:
            self._file.write(_ENTRY.pack(offset, length))
        self._file.write(_TAIL.pack(self._rows, len(self._index)) + MAGIC)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _flush(self, *, final: bool) -> None:
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        at = 0
        while table.num_rows - at >= ROWS_PER_CHUNK or (final and at < table.num_rows):
            piece = table.slice(at, ROWS_PER_CHUNK)
            self._seal_chunk(piece)
            at += piece.num_rows
        rest = table.slice(at)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _seal_chunk(self, piece: pa.Table) -> None:
        """One chunk: an IPC stream of one record batch, sealed, appended."""
        sink = pa.BufferOutputStream()
        if piece.column(0).num_chunks > 1:
            piece = piece.combine_chunks()  # a chunk across two blocks: one copy
        with pa.ipc.new_stream(sink, self._schema, options=WRITE_OPTIONS) as stream:
            stream.write_batch(piece.to_batches()[0])
        nonce = os.urandom(NONCE)
        sealed = self._seal.encrypt(nonce, sink.getvalue().to_pybytes(),
                                    _aad(self._batch_id, len(self._index)))
        self._file.write(nonce)
        self._file.write(sealed)
        self._index.append((self._offset, NONCE + len(sealed)))
        self._offset += NONCE + len(sealed)
        self._rows += piece.num_rows

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
            self._file.close()
        self.temp.unlink(missing_ok=True)


class _Sealed:
    """An open ``.rows`` file: its index, and its chunks decrypted on demand."""

    def __init__(self, path: Path, key: AESGCM, batch_id: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.rows, self._index = _read_index(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._key = key
        self._batch_id = batch_id

    def chunk(self, number: int) -> pa.RecordBatch:
        offset, length = self._index[number]
        frame = os.pread(self._fd, length, offset)
        plain = self._key.decrypt(frame[:NONCE], frame[NONCE:], _aad(self._batch_id, number))
        return pa.ipc.open_stream(pa.py_buffer(plain)).read_next_batch()

    @property
    def columns(self) -> bool:
        return bool(self._index)

    def close(self) -> None:
        os.close(self._fd)


def _read_index(fd: int) -> tuple[int, list[tuple[int, int]]]:
    """(rows, each chunk's offset and length) of an open ``.rows`` file."""
    size = os.fstat(fd).st_size
    end = size - _TAIL.size - len(MAGIC)
    tail = os.pread(fd, _TAIL.size + len(MAGIC), end)
    if end < len(MAGIC) or os.pread(fd, len(MAGIC), 0) != MAGIC or tail[_TAIL.size:] != MAGIC:
        raise ValueError("not a row file")
    rows, chunks = _TAIL.unpack(tail[:_TAIL.size])
    raw = os.pread(fd, chunks * _ENTRY.size, end - chunks * _ENTRY.size)
    return rows, [_ENTRY.unpack_from(raw, i * _ENTRY.size) for i in range(chunks)]


class _Legacy:
    """A plaintext ``.arrow`` file of the previous release (until ``encrypt_legacy``)."""

    def __init__(self, path: Path) -> None:
        self._source = pa.memory_map(str(path), "r")
        try:
            self._reader = pa.ipc.open_file(self._source)
            last = self._reader.num_record_batches - 1
            self.rows = (last * ROWS_PER_CHUNK + self._reader.get_batch(last).num_rows
                         if last >= 0 else 0)
        except BaseException:
            self._source.close()
            raise
        self.columns = True

    def chunk(self, number: int) -> pa.RecordBatch:
        return self._reader.get_batch(number)

    def close(self) -> None:
        self._source.close()


class ArrowRowStore:
    """The region's row data: writers for the core, lookups for the web side.

    ``key``: the region's rows key (32 bytes). ``keep``: what to keep of a project's
    rows (default: every column)."""

    def __init__(self, root: Path, *, key: bytes, keep: Keep | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._key_bytes = key
        self._key = AESGCM(key)
        self.keep = keep or (lambda client, project, columns: list(columns))
        self._lock = threading.Lock()
        self._readers: OrderedDict[int, _Sealed | _Legacy] = OrderedDict()
        self._chunks: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()

    def path_of(self, batch_id: int) -> Path:
        return self.root / f"batch-{batch_id}.rows"

    def _legacy_path(self, batch_id: int) -> Path:
        return self.root / f"batch-{batch_id}.arrow"

    def writer(self, batch_id: int, columns: Sequence[str], *, client: str = "",
               project: str = "") -> RowWriter:
        """A batch's writer, keeping of ``columns`` what the project's pages read."""
        self._forget(batch_id)  # a restarted batch writes its file anew
        kept = self.keep(client, project, columns)
        return RowWriter(self.path_of(batch_id), kept, key=self._key_bytes,
                         batch_id=batch_id)

    def _reader(self, batch_id: int) -> _Sealed | _Legacy | None:
        with self._lock:
            hit = self._readers.get(batch_id)
            if hit is not None:
                self._readers.move_to_end(batch_id)
                return hit
        try:
            found: _Sealed | _Legacy = _Sealed(self.path_of(batch_id), self._key, batch_id)
        except FileNotFoundError:
            try:
                found = _Legacy(self._legacy_path(batch_id))
            except FileNotFoundError:
                return None
            except (pa.ArrowInvalid, OSError):
                log.exception("row data of batch %d is unreadable", batch_id)
                return None
        except (ValueError, OSError, struct.error):
            log.exception("row data of batch %d is unreadable", batch_id)
            return None
        with self._lock:
            self._readers[batch_id] = found
            while len(self._readers) > OPEN_READERS:
                _, old = self._readers.popitem(last=False)
                old.close()
        return found

    def _chunk(self, batch_id: int, reader: _Sealed | _Legacy, number: int) -> pa.RecordBatch:
        with self._lock:
            hit = self._chunks.get((batch_id, number))
            if hit is not None:
                self._chunks.move_to_end((batch_id, number))
                return hit
        batch = reader.chunk(number)
        with self._lock:
            self._chunks[batch_id, number] = batch
            while len(self._chunks) > DECODED_CHUNKS:
                self._chunks.popitem(last=False)
        return batch

    def lookup(self, batch_id: int, ordinal: int) -> dict[str, str] | None:
        """The row's kept values by column name, or None if the batch or row is not here
        (or its file does not open with the region's key)."""
        found = self._reader(batch_id)
        if found is None or not 0 <= ordinal < found.rows:
            return None
        if not found.columns:
            return {}
        number, at = divmod(ordinal, ROWS_PER_CHUNK)
        try:
            batch = self._chunk(batch_id, found, number)
        except (InvalidTag, pa.ArrowInvalid, OSError):
            log.error("row data of batch %d does not open with the region's rows key "  # noqa: TRY400 - no trace needed
                      "(chunk %d)", batch_id, number)
            return None
        return {name: batch.column(i)[at].as_py()
                for i, name in enumerate(batch.schema.names)}

    def row_count(self, batch_id: int) -> int:
        found = self._reader(batch_id)
        return 0 if found is None else int(found.rows)

    def _forget(self, batch_id: int) -> None:
        with self._lock:
            hit = self._readers.pop(batch_id, None)
            for cached in [k for k in self._chunks if k[0] == batch_id]:
                del self._chunks[cached]
        if hit is not None:
            hit.close()

    def delete(self, batch_id: int) -> bool:
        """Remove a batch's row data (retention); True if there was any."""
        self._forget(batch_id)
        removed = False
        for path in (self.path_of(batch_id), self._legacy_path(batch_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        return removed

    def batch_ids(self) -> list[int]:
        return sorted({int(m.group(1)) for p in self.root.iterdir()
                       if (m := _NAME.match(p.name))})

    def encrypt_legacy(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Seal each plaintext file of the previous release (all its columns: which
        project it was is not known here), one chunk at a time, until ``stop``; the
        number converted. Safe beside lookups and another instance doing the same."""
        converted = 0
        for legacy in sorted(self.root.glob("batch-*.arrow")):
            if stop():
                break
            match = _NAME.match(legacy.name)
            if match is None:
                continue
            batch_id = int(match.group(1))
            try:
                source = _Legacy(legacy)
            except FileNotFoundError:
                continue  # another instance converted it
            except (pa.ArrowInvalid, OSError):
                log.exception("row data of batch %d is unreadable; left as it is", batch_id)
                continue
            try:
                converted += self._convert(batch_id, source, legacy)
            finally:
                source.close()
        if converted:
            log.info("row store: %d file(s) of the previous release encrypted", converted)
        return converted

    def _convert(self, batch_id: int, source: _Legacy, legacy: Path) -> int:
        first = source.chunk(0) if source.rows else None
        names = first.schema.names if first is not None else []
        final = self.path_of(batch_id)
        writer = RowWriter(final, names, key=self._key_bytes, batch_id=batch_id,
                           temp=final.with_name(f".{final.name}.{os.getpid()}.part"))
        try:
            at = 0
            for number in range(-(-int(source.rows) // ROWS_PER_CHUNK)):
                batch = source.chunk(number)
                writer.write(at, {n: batch.column(n) for n in names}, batch.num_rows)
                at += batch.num_rows
            writer.commit()
        except BaseException:
            writer.discard()
            raise
        self._forget(batch_id)
        legacy.unlink(missing_ok=True)
        return 1

    def close(self) -> None:
        with self._lock:
            readers, self._readers = list(self._readers.values()), OrderedDict()
            self._chunks.clear()
        for reader in readers:
            reader.close()
