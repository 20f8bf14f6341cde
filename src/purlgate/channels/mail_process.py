"""The mail worker's entries in worker processes.

Handling a message (parsing it, the batch core, building the reply and notifications,
queueing them) is Python that holds the GIL: in threads, one core did all of it while
the listeners and the outbox waited for the same lock. Here ``MailWorker.handle`` runs
in one of ``processing.workers`` processes (forked from a forkserver that has loaded
the mail path: ``purlgate.mail_forkserver``), each with its own region (store
connection, row store, ledger) and an outbox it only queues into, built by the factory
the gateway hands over (``mail_side.MailSideFactory``: the same wiring); the parent keeps the
per-client scheduling, the listeners, the outbox's deliveries and the web side, and
replays each batch's lifecycle events to its own subscribers (the links' pre-drawing,
the metrics).

A worker process dies with its parent, the forkserver, which dies with ``serve``
(``PR_SET_PDEATHSIG``): after a kill -9 of ``serve`` nothing goes on handling an entry
that the next start will handle again. A
worker that dies (OOM, a crash point) breaks the pool: the entry in hand counts as a
failed attempt and a new pool starts. A storage fault crosses the process boundary as
a ``StorageError`` (its cause would not survive pickling), so the parent pauses as it
should.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purlgate.channels.mail_worker import MailWorker
from purlgate.channels.queue_worker import give_back_memory
from purlgate.channels.spool import SpoolEntry
from purlgate.core.lifecycle import BatchEvent
from purlgate.core.pipeline import Subscriber
from purlgate.errors import ServerError, StorageError, is_storage_fault
from purlgate.lifeline import die_with_parent

log = logging.getLogger("purlgate.mail")

# In a worker process: its mail worker, and the events of the entry in hand.
_handler: MailWorker | None = None
_events: list[BatchEvent] = []
# Whether a worker has grown on big entries: what the heap keeps after them (pages with
# a live object here and there: some 12 MB after a burst of 20 MB files, on top of the
# 16 MB a first entry builds at first use) goes only with the process, so the
# processes are then replaced as soon as none has an entry in hand, forked afresh
# (under 0.1 s in all). A worker has grown when, the heap trimmed after an entry, it
# holds ``processing.recycle_mb`` more private memory than when it took its first.
# That is read (0.6 ms) only once its peak RSS has risen PEAK_MB (the cheap test:
# nothing big was held; the RSS also counts the forkserver's pages an entry first
# touches), and again only when the peak has risen since: small entries after a big
# one do not pay for it.
PEAK_MB = 32
_began: tuple[int, int] | None = None  # (peak RSS, private) MB as it took its first entry
_looked_at = 0  # the peak RSS (MB) when its private memory was last read


# Builds a worker process's mail worker; handed each batch event to pass back.
WorkerFactory = Callable[[Subscriber], MailWorker]


@dataclass(frozen=True)
class _Setup:
    factory: WorkerFactory  # picklable: it crosses into the spawned process
    env: dict[str, str]  # what the parent reads secrets from, as it is now
    logs: tuple[str, str]  # level and format, as serve logs
    parent: int
    warmed: Any  # a multiprocessing Barrier of all the workers (see ``_warm``)
    recycle_mb: int  # processing.recycle_mb (see ``PEAK_MB``)


_setup: _Setup | None = None


def _start(setup: _Setup) -> None:
    """Nothing here may fail (a failing initializer breaks the pool, and why is lost):
    the worker itself is built at the first entry, and its errors reach the parent."""
    global _setup  # noqa: PLW0603 - one worker per process
    forkserver = sys.modules.get("purlgate.mail_forkserver")
    die_with_parent(getattr(forkserver, "PID", setup.parent))
    os.environ.update(setup.env)
    from purlgate.logs import setup_logging  # noqa: PLC0415

    setup_logging(*setup.logs)
    _setup = setup


def _worker() -> MailWorker:
    global _handler  # noqa: PLW0603 - one worker per process
    if _handler is None:
        assert _setup is not None
        _handler = _setup.factory(_events.append)
    return _handler


def _warm() -> None:
    """Build this process's mail worker before the first entry arrives. Each process
    takes exactly one: a warmed one waits at the barrier for the others. A failure is
    reported by the first entry, which builds the worker again."""
    try:
        _worker()
    except Exception:  # the first entry raises it again, to the parent
        log.warning("mail worker process %d could not be prepared; the first message "
                    "will try again", os.getpid(), exc_info=True)
    else:
        log.info("mail worker process %d ready", os.getpid())
    assert _setup is not None
    with contextlib.suppress(threading.BrokenBarrierError):
        _setup.warmed.wait(timeout=10)


def _peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _private_mb() -> int:
    """The memory only this process holds (its private pages), MB."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:  # not Linux: never counted as grown
        return 0
    return sum(int(line.split()[1]) for line in rollup.splitlines()
               if line.startswith(("Private_Clean:", "Private_Dirty:"))) // 1024


def _has_grown() -> bool:
    """Whether this process keeps memory big entries left (see ``PEAK_MB``)."""
    global _looked_at  # noqa: PLW0603 - one worker per process
    if _began is None or _setup is None or not _setup.recycle_mb:
        return False
    peak = _peak_mb()
    if peak - _began[0] < PEAK_MB or peak <= _looked_at:
        return False
    _looked_at = peak
    return _private_mb() - _began[1] > _setup.recycle_mb


def _handle(entry: SpoolEntry) -> tuple[list[BatchEvent], list[str], bool]:
    """The entry handled: its events, the outbox entries it queued, and whether this
    process has grown (see ``PEAK_MB``)."""
    global _began  # noqa: PLW0603 - one worker per process
    _events.clear()
    try:
        handler = _worker()  # a full disk can stop even this: it is a storage fault too
        if _began is None:
            give_back_memory()
            _began = (_peak_mb(), _private_mb())
        handler.outbox.enqueued = []
        handler.handle(entry)
    except Exception as exc:
        if is_storage_fault(exc) and not isinstance(exc, StorageError):
            raise StorageError(f"{type(exc).__name__}: {exc}") from None
        raise
    finally:
        give_back_memory()
    return list(_events), handler.outbox.enqueued or [], _has_grown()


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The context the workers are made in: forked from a forkserver that has loaded
    the mail path once (``mail_forkserver``), so they share it. Not ``fork`` from
    serve: serve has threads and sockets no worker should inherit."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["purlgate.mail_forkserver"])
    return context


class MailProcesses:
    """``mail_worker.Elsewhere``: entries handled in ``workers`` worker processes."""

    def __init__(self, factory: WorkerFactory, workers: int, *, recycle_mb: int = 0) -> None:
        self.factory = factory
        self.workers = workers
        self.recycle_mb = recycle_mb
        self._pool: ProcessPoolExecutor | None = None
        self._warming: list[Future[None]] = []
        self._in_hand = 0  # entries being handled
        self._grown = False  # a process has grown: replace them when none is busy

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from purlgate import logs  # noqa: PLC0415

            context = _forkserver()
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start,
                initargs=(_Setup(self.factory,
                                 {**os.environ, "PURLGATE_MAIN_PID": str(os.getpid())},
                                 logs.current, os.getpid(), context.Barrier(self.workers),
                                 self.recycle_mb),))
        return self._pool

    def warm(self) -> None:
        """Start the processes and have each build its mail worker now (at a start about
        0.6 s: the forkserver's imports, then a fork and the set-up each; a replacement
        under 0.1 s), so that the first message is not the one that waits for it.
        Called on the event loop thread, as ``handle``."""
        pool = self._executor()
        self._warming = [pool.submit(_warm) for _ in range(self.workers)]

    async def warmed(self) -> None:
        """Until every process has prepared its mail worker (or failed to: the first
        entry then tries again)."""
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._warming),
                             return_exceptions=True)

    async def handle(self, entry: SpoolEntry) -> tuple[list[BatchEvent], list[str]]:
        """Handle ``entry`` in a worker process; its batch events and the outbox entries
        it queued come back.

        Called on the event loop thread, which starts the processes (the death signal
        follows the thread that made them, and this one lasts as long as the process).
        """
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            running = loop.run_in_executor(pool, _handle, entry)
        except BrokenProcessPool:
            # Broken before this entry (a process died while warming or idle): not the
            # entry's fault, it goes to a new pool.
            self._discard(pool)
            pool = self._executor()
            running = loop.run_in_executor(pool, _handle, entry)
        self._in_hand += 1
        try:
            events, enqueued, grown = await running
        except BrokenProcessPool as exc:
            self._discard(pool)
            raise ServerError("a mail worker process died while handling the entry") from exc
        finally:
            self._in_hand -= 1
        self._grown = self._grown or grown
        if self._grown and not self._in_hand and self._pool is pool:
            self._grown = False
            log.info("mail worker processes replaced: one kept more than %d MB after "
                     "big entries (processing.recycle_mb)", self.recycle_mb)
            self._discard(pool)
            self.warm()
        return events, enqueued

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
