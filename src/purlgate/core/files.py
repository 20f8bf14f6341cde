"""Durable file writes: temporary hidden name, fsync, rename, fsync the folder.

A reader of the folder (an SFTP client polling Downloads, a script waiting for the
``.flg``) never sees a half-written file under its final name. ``GroupSync`` shares
one folder fsync among the threads that renamed into it (the spools, the outbox).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol, Self

from purlgate.errors import StorageError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RESULT_MODE = 0o640  # PURL, flag and error files: the owner writes, its group may read

SYNC_FILE_RANGE_WRITE = 2
_libc: Any = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes of ``fd`` from ``offset`` to disk
    now, without waiting (Linux's sync_file_range): a big file written as it arrives
    then needs only its tail flushed by the fsync that commits it. Elsewhere, nothing."""
    global _libc  # noqa: PLW0603 - looked up once
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True).sync_file_range
            _libc.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # advice: its result is not ours


def thread_scratch(root: Path) -> Path:
    """This thread's scratch folder under ``root`` (0700), used batch after batch: each
    thread works on one batch at a time, and ``clear_scratch`` empties it between."""
    folder = root / f"t{os.getpid()}-{threading.get_ident()}"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def clear_scratch(folder: Path, keep: Callable[[str], bool]) -> None:
    """Empty a scratch folder for its next use. The files ``keep`` names (the ones every
    batch makes again) are truncated to nothing rather than removed, the folders it
    names are left as they are (their owner empties them), and ``retire``'s spares
    stay; anything else goes.

    Why not remove them all: on ext4 without a journal (as some VMs have it) each new
    file scans past every file deleted in the last seconds, so a busy gateway that makes
    and deletes a dozen scratch files per message pays more for each as it gets busier.
    Truncated, no client data is left, and the next batch's file takes the same inode.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.name.startswith(SPARE_PREFIX):
                continue  # empty already, and ``retire``'s list still names it
            if keep(entry.name):
                if not is_dir and entry.stat(follow_symlinks=False).st_size:
                    os.truncate(entry.path, 0)
            elif is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink()


_spares = threading.local()  # per thread: empty files whose inodes the next files take
MAX_SPARES = 8
SPARE_PREFIX = "spare-"


def retire(path: Path, scratch: Path) -> None:
    """Done with ``path`` (a file of ours): emptied and kept in this thread's
    ``scratch`` folder, so that this thread's next ``AtomicFile`` takes its inode
    instead of allocating one (see ``clear_scratch`` for why that matters here)."""
    spares: list[Path] = _spares.__dict__.setdefault("files", [])
    if len(spares) >= MAX_SPARES or path.stat().st_nlink != 1:
        # A second name of the same file (a crash between a commit's link and unlink
        # leaves one): only this name goes; an inode is never a spare twice.
        path.unlink(missing_ok=True)
        return
    n = len(spares)
    while (spare := scratch / f"{SPARE_PREFIX}{n}") in spares or spare.exists():
        n += 1
    path.replace(spare)
    os.truncate(spare, 0)
    spares.append(spare)


def _take_spare(target: Path) -> bool:
    """Move one of this thread's spare files to ``target``; False if there is none."""
    spares: list[Path] = _spares.__dict__.get("files", [])
    while spares:
        try:
            spares.pop().replace(target)
        except OSError:
            continue  # gone (a sweep) or on another file system: try the next
        return True
    return False


def sweep_scratch(root: Path) -> None:
    """Remove the scratch folders of processes that no longer run (a crash, a restart)."""
    for folder in root.glob("t*-*"):
        pid = folder.name[1:].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def private_file(path: Path) -> BinaryIO:
    """A new scratch file only we can read (0600), for decrypted or unwrapped data."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


class AtomicFile:
    """Write ``final`` through ``.<final>.part`` and publish it only on ``commit()``.

    By default an existing ``final`` is never replaced (the commit fails instead). The
    file gets exactly ``mode`` (0600 unless said: what we write holds client data),
    whatever the process umask.

    Leaving the ``with`` block without ``commit()`` (an exception, an early return)
    removes the temporary file, so nothing partial is left behind.
    """

    def __init__(self, final: Path, *, mode: int = 0o600, no_clobber: bool = True,
                 sync_dir: bool = True) -> None:
        self.final = final
        # False: the caller makes the rename durable itself (one folder fsync for several
        # files of one commit).
        self._sync_dir = sync_dir
        self._no_clobber = no_clobber
        self.temp = final.with_name(f".{final.name}.part")
        self._mode = mode
        self._file: BinaryIO | None = None
        self.committed = False

    def __enter__(self) -> Self:
        try:
            _take_spare(self.temp)  # an inode this thread let go of, if it has one
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT, self._mode)
            if os.fstat(fd).st_nlink != 1:
                # A .part left by a crash between a commit's link and unlink is a second
                # name of the published file: never write through it, start a new one.
                os.close(fd)
                self.temp.unlink()
                fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._mode)
            os.ftruncate(fd, 0)
            os.fchmod(fd, self._mode)
        except OSError as exc:
            raise StorageError(f"cannot create {self.temp.name}: {exc.strerror}") from exc
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        return self

    @property
    def file(self) -> BinaryIO:
        assert self._file is not None, "use AtomicFile in a with block"
        return self._file

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self._no_clobber:
                # link() fails if the name exists: an earlier file is never replaced.
                os.link(self.temp, self.final)
                self.temp.unlink()
            else:
                self.temp.replace(self.final)
            if self._sync_dir:
                fsync_dir(self.final.parent)
        except FileExistsError as exc:
            raise StorageError(f"{self.final.name} already exists; not overwriting it") from exc
        except OSError as exc:
            raise StorageError(f"cannot publish {self.final.name}: {exc.strerror}") from exc
        self.committed = True
        return self.final

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.committed:
            return
        if self._file is not None and not self._file.closed:
            # Closing flushes, and on a full disk that fails too: the error in hand (the
            # storage fault that got us here) is the one to report, and the .part goes.
            with contextlib.suppress(OSError):
                self._file.close()
        self.temp.unlink(missing_ok=True)


class Digest(Protocol):
    """A hash being fed (hashlib's)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class BackgroundWriter:
    """Hand writes to a thread so that disk time overlaps the next block's work.

    Writing a fresh file costs the kernel real time (block allocation); ``write``
    releases the GIL, so on a second core it runs beside Arrow's kernels. At most
    ``depth`` blocks wait in the queue: memory stays flat. The first error is raised
    from ``write`` or ``close``. The first ``inline_bytes`` are written where they come
    from: a small file (most are) is done before a thread would have started.
    """

    def __init__(self, out: BinaryIO, depth: int = 4, inline_bytes: int = 1 << 20,
                 digest: Digest | None = None) -> None:
        self._out = out
        self._digest = digest  # fed what is written, in the thread that writes it
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._inline_left = inline_bytes
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._put(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc

    def _put(self, data: memoryview | bytes) -> None:
        self._out.write(data)
        if self._digest is not None:
            self._digest.update(data)  # releases the GIL: beside the next block's work

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: memoryview | bytes) -> None:
        self._raise()
        if self._thread is None:
            if len(data) <= self._inline_left:
                self._inline_left -= len(data)
                self._put(data)
                return
            self._thread = threading.Thread(target=self._run, name="purl-writer",
                                            daemon=True)
            self._thread.start()
        self._queue.put(memoryview(data))

    def close(self) -> None:
        """Wait for every queued write; raise the first error, if any."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


def write_json(path: Path, value: object) -> None:
    with AtomicFile(path, no_clobber=False) as out:
        out.file.write(json.dumps(value).encode())
        out.commit()


class GroupSync:
    """fsync a folder for many callers at once: one sync covers every earlier rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._completed < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested  # every rename before this point
                self._cond.release()
                try:
                    fsync_dir(self.folder)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._completed = max(self._completed, covers)


def publish_once(path: Path, data: bytes, mode: int = 0o600) -> bytes:
    """Write ``data`` to ``path`` unless it exists; what ``path`` holds in the end.

    For what an instance makes on its first start (the token key, the SSH host key):
    with several instances sharing a folder and starting together, exactly one file is
    published (a private temporary name, fsynced, linked into place) and every instance
    reads that one, never a half-written file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return path.read_bytes()  # another instance (or process) was first
        fsync_dir(path.parent)
        return data
    finally:
        temp.unlink(missing_ok=True)
