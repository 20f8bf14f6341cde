"""One scheduler for every spool: fair, parallel, retrying, with a dead-letter.

Entries wait in one queue per client, and the queues are served in turn: a burst from
one client, or one client's million-row file, does not hold up another client's small
file while a worker is free. Up to ``workers`` entries are handled at once, each in a
thread, or however ``run`` says (the mail worker hands them to worker processes).

What goes wrong decides what happens next:

- a storage fault (disk full, quota, I/O error) pauses every worker and puts the entry
  back at the front of its queue; the pause doubles up to a minute and ends by itself
  once a try succeeds: nothing is lost and nothing is given up on;
- a ``ConfigError`` cannot heal while this process runs, nor can a damaged spool
  entry (``DamagedEntryError``); another error that repeats
  ``max_attempts`` times is not going to heal either: ``on_dead`` moves the entry to the
  dead-letter folder and answers the client (the channel decides how);
- any other error is tried again after a doubling delay, meanwhile other entries go on.

Entries a previous run left (``pending``) are queued first, and the spool is looked at
again every ``RESCAN_SECONDS`` (what ``purlgate dead-letters --requeue`` put back).

With several instances sharing the spool (``share``), each entry is leased before it is
handled: an entry another instance holds is passed over (it is not ours to do), and
the spool is looked at more often, so that the entries of an instance that died are
taken over soon after their leases run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from purlgate.core.leases import Leases
from purlgate.errors import ConfigError, DamagedEntryError, is_storage_fault

T = TypeVar("T")
log = logging.getLogger("purlgate.worker")

RESCAN_SECONDS = 30.0
STORAGE_PAUSE_FIRST = 1.0
STORAGE_PAUSE_MAX = 60.0


def _libc_trim() -> Callable[[int], object] | None:
    try:
        trim: Callable[[int], object] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_TRIM = _libc_trim()


def give_back_memory() -> None:
    """Hand the heap freed by an entry back to the system: glibc keeps it otherwise,
    and a burst of big messages would leave the process at its peak for good. Arrow's
    pool too, whichever it is (not glibc's: see ``region.use_system_allocator``)."""
    if _TRIM is not None:
        _TRIM(0)
    arrow = sys.modules.get("pyarrow")  # (a process that never loaded it holds none)
    if arrow is not None and arrow.default_memory_pool().backend_name != "system":
        arrow.default_memory_pool().release_unused()  # (glibc's was just trimmed)


def is_deterministic(exc: BaseException) -> bool:
    """Trying again in this process cannot help."""
    return isinstance(exc, ConfigError | DamagedEntryError)


class QueueWorker(Generic[T]):
    def __init__(self, name: str, *, handle: Callable[[T], None],
                 pending: Callable[[], Sequence[T]], ident: Callable[[T], str],
                 fair_key: Callable[[T], Hashable] = lambda item: None, workers: int = 1,
                 max_attempts: int = 3, retry_seconds: float = 5.0,
                 on_dead: Callable[[T, BaseException, int], None] | None = None,
                 run: Callable[[T], Awaitable[None]] | None = None) -> None:
        self.name = name
        self._handle = handle
        # How an entry is handled: ``handle`` in a thread, unless ``run`` says otherwise
        # (a worker process then hands back its own freed heap).
        self._run = run or (lambda item: asyncio.to_thread(self._handle_here, item))
        self._pending = pending
        self._ident = ident
        self._fair_key = fair_key
        self.workers = max(1, workers)
        self.max_attempts = max(1, max_attempts)
        self.retry_seconds = retry_seconds
        self._on_dead = on_dead
        self._queues: dict[Hashable, deque[T]] = {}
        self._turns: deque[Hashable] = deque()  # keys with something queued, in turn
        self._known: set[str] = set()  # queued, running or waiting for a retry
        self._attempts: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused_until = 0.0
        self._pause = STORAGE_PAUSE_FIRST
        self.running = 0
        self.dead_letters = 0  # moved to the dead-letter folder by this process
        self._leases: Leases | None = None
        self._exists: Callable[[T], bool] = lambda item: True
        self.rescan_seconds = RESCAN_SECONDS

    def share(self, leases: Leases, exists: Callable[[T], bool]) -> None:
        """Other instances work on the same spool: lease each entry before handling it,
        and handle it only if it is still there (``exists``: another instance may have
        finished it since this one listed it)."""
        self._leases = leases
        self._exists = exists
        self.rescan_seconds = min(RESCAN_SECONDS, leases.seconds / 3)

    def _handle_here(self, item: T) -> None:
        try:
            self._handle(item)
        finally:
            give_back_memory()

    # -- intake (any thread) ------------------------------------------------------------

    def submit(self, item: T) -> None:
        """Hand over an entry (from the loop or from another thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._add, item)
        else:
            self._add(item)

    @property
    def idle(self) -> bool:
        """Nothing queued, running or waiting for a retry."""
        return not self._known and self.running == 0

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _add(self, item: T) -> None:
        ident = self._ident(item)
        if ident in self._known:
            return
        self._known.add(ident)
        self._enqueue(item)

    def _enqueue(self, item: T, *, front: bool = False) -> None:
        key = self._fair_key(item)
        queue = self._queues.setdefault(key, deque())
        if not queue:
            if front:
                self._turns.appendleft(key)
            else:
                self._turns.append(key)
        if front:
            queue.appendleft(item)
        else:
            queue.append(item)
        self._ready.set()

    def _take(self) -> T | None:
        if not self._turns:
            return None
        key = self._turns.popleft()
        queue = self._queues[key]
        item = queue.popleft()
        if queue:
            self._turns.append(key)  # this client's next entry waits for the others
        else:
            del self._queues[key]
        return item

    # -- running ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self._look()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(self.workers):
                tasks.create_task(self._work(stop))
            tasks.create_task(self._rescan(stop))

    async def _rescan(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rescan_seconds)
            if stop.is_set():
                return
            await self._look()

    async def _look(self) -> None:
        """Queue what the spool holds; a spool that cannot be read now (a disk error) is
        looked at again at the next rescan: nothing in it is given up on."""
        try:
            found = await asyncio.to_thread(self._pending)
        except Exception as exc:  # noqa: BLE001 - a look must never end the worker
            log.warning("%s: could not look at the spool (%s); looking again in %.0f s",
                        self.name, getattr(exc, "message", None) or type(exc).__name__,
                        RESCAN_SECONDS)
            return
        for item in found:
            self._add(item)

    async def _next(self, stop: asyncio.Event) -> T | None:
        assert self._loop is not None
        while not stop.is_set():
            wait = self._paused_until - self._loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                continue
            item = self._take()
            if item is not None:
                return item
            self._ready.clear()
            ready = asyncio.ensure_future(self._ready.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
        return None

    async def _work(self, stop: asyncio.Event) -> None:
        assert self._loop is not None
        while (item := await self._next(stop)) is not None:
            ident = self._ident(item)
            if not await self._lease(item, ident):
                continue
            self.running += 1
            try:
                await self._run(item)
            except Exception as exc:  # noqa: BLE001 - every failure is sorted below
                await self._failed(item, ident, exc)
            else:
                self._done(ident)
                self._pause = STORAGE_PAUSE_FIRST
            finally:
                self.running -= 1
                await self._let_go(ident)

    async def _lease(self, item: T, ident: str) -> bool:
        """Whether this instance is to handle ``item`` now (always, alone)."""
        leases = self._leases
        if leases is None:
            return True
        try:
            mine = await asyncio.to_thread(leases.claim, self.name, ident)
            if mine and not await asyncio.to_thread(self._exists, item):
                await asyncio.to_thread(leases.release, self.name, ident)
                mine = False  # finished by another instance since we listed it
        except Exception as exc:  # noqa: BLE001 - sorted like a handling failure
            await self._failed(item, ident, exc)
            return False
        if not mine:
            log.debug("%s: entry %s is another instance's", self.name, ident)
            self._done(ident)  # a later look brings it back if that instance dies
        return mine

    async def _let_go(self, ident: str) -> None:
        if self._leases is None:
            return
        try:
            await asyncio.to_thread(self._leases.release, self.name, ident)
        except Exception as exc:  # noqa: BLE001 - the lease then simply runs out
            log.warning("%s: could not release the lease on %s (%s); it runs out by "
                        "itself", self.name, ident, getattr(exc, "message", None) or exc)

    def _done(self, ident: str) -> None:
        self._known.discard(ident)
        self._attempts.pop(ident, None)

    async def _failed(self, item: T, ident: str, exc: Exception) -> None:
        assert self._loop is not None
        if is_storage_fault(exc):
            log.warning("%s: storage fault (%s); all work paused %.1f s, entry %s kept",
                        self.name, getattr(exc, "message", None) or exc, self._pause, ident)
            self._storage_pause(item)
            return
        attempts = self._attempts.get(ident, 0) + 1
        self._attempts[ident] = attempts
        if is_deterministic(exc) or attempts >= self.max_attempts:
            await self._dead(item, ident, exc, attempts)
            return
        delay = self.retry_seconds * 2 ** (attempts - 1)
        log.warning("%s: entry %s failed (%s, attempt %d of %d); trying again in %.0f s",
                    self.name, ident, type(exc).__name__, attempts, self.max_attempts, delay,
                    exc_info=exc)
        self._loop.call_later(delay, self._enqueue, item)

    def _storage_pause(self, item: T) -> None:
        """Every worker waits (doubling, up to a minute); the entry goes first again."""
        assert self._loop is not None
        self._paused_until = self._loop.time() + self._pause
        self._pause = min(self._pause * 2, STORAGE_PAUSE_MAX)
        self._enqueue(item, front=True)

    async def _dead(self, item: T, ident: str, exc: Exception, attempts: int) -> None:
        log.error("%s: entry %s failed for good (%s after %d attempt(s)); dead-lettered",
                  self.name, ident, type(exc).__name__, attempts, exc_info=exc)
        if self._on_dead is None:
            self._done(ident)
            return
        try:
            await asyncio.to_thread(self._on_dead, item, exc, attempts)
        except Exception as again:
            if is_storage_fault(again):
                self._storage_pause(item)
                return
            log.exception("%s: entry %s could not be dead-lettered; tried again in %.0f s",
                          self.name, ident, RESCAN_SECONDS)
            assert self._loop is not None
            self._loop.call_later(RESCAN_SECONDS, self._enqueue, item)
            return
        self.dead_letters += 1
        self._done(ident)


