"""The mail worker's entries in worker processes.

Handling a message (parsing it, the batch core, building the reply and notifications,
queueing them) is Python that holds the GIL: in threads, one core did all of it while
the listeners and the outbox waited for the same lock. Here ``MailWorker.handle`` runs
in one of ``processing.workers`` spawned processes, each with its own region (store
connection, row store, ledger) and an outbox it only queues into; the parent keeps the
per-client scheduling, the listeners, the outbox's deliveries and the web side, and
replays each batch's lifecycle events to its own subscribers (the links' pre-drawing,
the metrics).

A worker process dies with the parent (``PR_SET_PDEATHSIG``): after a kill -9 of
``serve`` nothing goes on handling an entry that the next start will handle again. A
worker that dies (OOM, a crash point) breaks the pool: the entry in hand counts as a
failed attempt and a new pool starts. A storage fault crosses the process boundary as
a ``StorageError`` (its cause would not survive pickling), so the parent pauses as it
should.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from purlgate.channels.spool import SpoolEntry
from purlgate.config import Config
from purlgate.core.lifecycle import BatchEvent
from purlgate.errors import ServerError, StorageError, is_storage_fault

PR_SET_PDEATHSIG = 1

# In a worker process: its mail worker, and the events of the entry in hand.
_handler: object = None
_events: list[BatchEvent] = []


def _die_with(parent: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc: the pipe's EOF still ends us
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


@dataclass(frozen=True)
class _Setup:
    config: Config
    region_id: str
    data_dir: Path
    env: dict[str, str]  # what the parent reads secrets from, as it is now
    logs: tuple[str, str]  # level and format, as serve logs
    parent: int


_setup: _Setup | None = None


def _start(setup: _Setup) -> None:
    """Nothing here may fail (a failing initializer breaks the pool, and why is lost):
    the worker itself is built at the first entry, and its errors reach the parent."""
    global _setup  # noqa: PLW0603 - one worker per process
    _die_with(setup.parent)
    os.environ.update(setup.env)
    from purlgate.logs import setup_logging  # noqa: PLC0415

    setup_logging(*setup.logs)
    _setup = setup


def _worker() -> object:
    global _handler  # noqa: PLW0603 - one worker per process
    if _handler is None:
        from purlgate.app import build_mail_worker  # noqa: PLC0415 - app imports us

        assert _setup is not None
        _handler = build_mail_worker(_setup.config, _setup.region_id, _setup.data_dir,
                                     on_event=_events.append)
    return _handler


def _handle(entry: SpoolEntry) -> tuple[list[BatchEvent], list[str]]:
    from purlgate.channels.mail_worker import MailWorker  # noqa: PLC0415
    from purlgate.channels.queue_worker import give_back_memory  # noqa: PLC0415

    _events.clear()
    try:
        handler = _worker()  # a full disk can stop even this: it is a storage fault too
        assert isinstance(handler, MailWorker)
        handler.outbox.enqueued = []
        handler.handle(entry)
    except Exception as exc:
        if is_storage_fault(exc) and not isinstance(exc, StorageError):
            raise StorageError(f"{type(exc).__name__}: {exc}") from None
        raise
    finally:
        give_back_memory()
    return list(_events), handler.outbox.enqueued or []


class MailProcesses:
    def __init__(self, config: Config, region_id: str, data_dir: Path, workers: int) -> None:
        self.config = config
        self.region_id = region_id
        self.data_dir = data_dir
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from purlgate import logs  # noqa: PLC0415

            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(_Setup(self.config, self.region_id, self.data_dir,
                                 {**os.environ, "PURLGATE_MAIN_PID": str(os.getpid())},
                                 logs.current, os.getpid()),))
        return self._pool

    async def handle(self, entry: SpoolEntry) -> tuple[list[BatchEvent], list[str]]:
        """Handle ``entry`` in a worker process; its batch events and the outbox entries
        it queued come back.

        Called on the event loop thread, which starts the processes (the death signal
        follows the thread that made them, and this one lasts as long as the process).
        """
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _handle, entry)
        except BrokenProcessPool as exc:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise ServerError("a mail worker process died while handling the entry") from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
