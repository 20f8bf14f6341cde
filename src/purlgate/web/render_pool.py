"""The render pool: thumbnails and videos drawn in worker processes, never on the event
loop; one render per file however many viewers ask at once; over the queue, busy. A
render that takes longer than its time limit has its worker killed and replaced (its
viewers get a 503 with Retry-After), and closing the pool kills what is still drawing,
so a stop never waits for a render."""

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

    def __init__(self, workers: int, limit: int, timeout: float = 30.0) -> None:
        self._limit = limit
        self._workers = workers
        self._timeout = timeout
        self._executor = self._new_executor()
        self._inflight: dict[Path, asyncio.Future[Path]] = {}

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn: the workers inherit none of the server's sockets, threads or locks, and
        # are its own children, made from the event loop thread, so each dies with it
        # (the initializer); a forkserver between them outlived a kill -9 of serve.
        return ProcessPoolExecutor(max_workers=self._workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    @property
    def depth(self) -> int:
        return len(self._inflight)

    def warm(self) -> None:
        """Start the workers now (and import Pillow and FFmpeg there), not on a first view."""
        for _ in range(self._workers):
            self._executor.submit(warm_up)

    async def render(self, draw: Callable[[Canvas, Path], Path], canvas: Canvas,
                     target: Path) -> Path:
        future = self._inflight.get(target)
        if future is None:
            if len(self._inflight) >= self._limit:
                raise RenderBusyError
            try:
                future = asyncio.get_running_loop().run_in_executor(
                    self._executor, draw, canvas, target)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): the pool is unusable; start anew.
                log.warning("a render worker died; starting a new render pool")
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                future = asyncio.get_running_loop().run_in_executor(
                    self._executor, draw, canvas, target)
            self._inflight[target] = future
            future.add_done_callback(lambda _: self._inflight.pop(target, None))
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
        """Kill the workers (a render that runs on holds one forever) and start anew; the
        renders they held fail, and their viewers get a 503."""
        old = self._executor
        _kill(old)
        old.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def close(self) -> None:
        """Stop at once: what is still drawing is killed, nothing waits for it."""
        _kill(self._executor)
        self._executor.shutdown(wait=True, cancel_futures=True)


def _kill(executor: ProcessPoolExecutor) -> None:
    # The executor keeps its processes here; there is no public way to stop a task.
    for process in list(getattr(executor, "_processes", {}).values()):
        process.kill()


def _retrieve(future: asyncio.Future[Path]) -> None:
    """A render nobody waits for any more (timed out, pool replaced) still ends: read its
    outcome so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
