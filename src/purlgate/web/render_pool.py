"""The render pool: thumbnails and videos drawn in worker processes, never on the event
loop; one render per file however many viewers ask at once; over the queue, busy. A
render that takes longer than its time limit has its worker killed and replaced (its
viewers get a 503 with Retry-After), and closing the pool kills what is still drawing,
so a stop never waits for a render.

The processes start at the first render (it took 0.13-0.27 s here, Pillow and
FFmpeg's libraries loaded, against 3 ms for the next), not with serve, and stop once
nothing was drawn for ``idle_seconds`` (as Postfix's daemons end after ``max_idle``):
an idle region holds no renderer."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from purlgate.errors import RenderBusyError, RenderTimeoutError
from purlgate.lifeline import die_with_parent
from purlgate.web.media import Canvas, warm_up

log = logging.getLogger("purlgate.web")


class RenderPool:
    """Draws media in worker processes; one render per file however many ask at once."""

    def __init__(self, workers: int, limit: int, timeout: float = 30.0,
                 idle_seconds: float = 100.0) -> None:
        self._limit = limit
        self._workers = workers
        self._timeout = timeout
        self._idle_seconds = idle_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._inflight: dict[Path, asyncio.Future[Path]] = {}

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn: the workers inherit none of the server's sockets, threads or locks, and
        # are its own children, made from the event loop thread, so each dies with it
        # (the initializer).
        return ProcessPoolExecutor(max_workers=self._workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def _started(self) -> ProcessPoolExecutor:
        """The processes, started now if they are not running (on the event loop
        thread: see ``_new_executor``)."""
        if self._pool is None:
            self._pool = self._new_executor()
            for _ in range(self._workers):  # import Pillow and FFmpeg in each now
                self._pool.submit(warm_up)
        return self._pool

    @property
    def running(self) -> int:
        """How many render processes are alive."""
        if self._pool is None:
            return 0
        return sum(1 for p in getattr(self._pool, "_processes", {}).values() if p.is_alive())

    @property
    def depth(self) -> int:
        return len(self._inflight)

    def _ended(self, target: Path) -> None:
        """A render ended: the last of a while starts the idle clock."""
        self._inflight.pop(target, None)
        if not self._inflight and self._pool is not None:
            if self._idle is not None:
                self._idle.cancel()
            self._idle = asyncio.get_running_loop().call_later(self._idle_seconds,
                                                               self._stop_idle)

    def _stop_idle(self) -> None:
        self._idle = None
        if self._inflight or self._pool is None:
            return
        self._discard()
        log.info("render processes stopped after %.0f s without a render",
                 self._idle_seconds)

    async def render(self, draw: Callable[[Canvas, Path], Path], canvas: Canvas,
                     target: Path) -> Path:
        future = self._inflight.get(target)
        if future is None:
            if len(self._inflight) >= self._limit:
                raise RenderBusyError
            try:
                future = asyncio.get_running_loop().run_in_executor(
                    self._started(), draw, canvas, target)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): the pool is unusable; start anew.
                log.warning("a render worker died; starting a new render pool")
                self._discard()
                future = asyncio.get_running_loop().run_in_executor(
                    self._started(), draw, canvas, target)
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self._inflight[target] = future
            future.add_done_callback(lambda _: self._ended(target))
            future.add_done_callback(_retrieve)
        # A viewer who leaves does not cancel a render others may be waiting for.
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            if not future.done():
                log.warning("a render took longer than %.0f s; its worker is replaced",
                            self._timeout)
                self._replace()
            raise RenderTimeoutError from None

    def _replace(self) -> None:
        """Kill the workers (a render that runs on holds one forever); the renders they
        held fail, and their viewers get a 503. The next render starts new ones."""
        if self._pool is not None:
            _kill(self._pool)
        self._discard()

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop at once: what is still drawing is killed, nothing waits for it."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        pool, self._pool = self._pool, None
        if pool is not None:
            _kill(pool)
            pool.shutdown(wait=True, cancel_futures=True)


def _kill(executor: ProcessPoolExecutor) -> None:
    # The executor keeps its processes here; there is no public way to stop a task.
    for process in list(getattr(executor, "_processes", {}).values()):
        process.kill()


def _retrieve(future: asyncio.Future[Path]) -> None:
    """A render nobody waits for any more (timed out, pool replaced) still ends: read its
    outcome so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
