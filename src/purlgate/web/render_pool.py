"""The render pool: thumbnails and videos drawn in worker processes, never on the event
loop; one render per file however many viewers ask at once; over the queue, busy."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from purlgate.errors import RenderBusyError
from purlgate.web.media import Canvas, warm_up

log = logging.getLogger("purlgate.web")


class RenderPool:
    """Draws media in worker processes; one render per file however many ask at once."""

    def __init__(self, workers: int, limit: int) -> None:
        self._limit = limit
        self._workers = workers
        self._executor = self._new_executor()
        self._inflight: dict[Path, asyncio.Future[Path]] = {}

    def _new_executor(self) -> ProcessPoolExecutor:
        # forkserver: the workers do not inherit the server's sockets, threads or locks.
        return ProcessPoolExecutor(max_workers=self._workers,
                                   mp_context=multiprocessing.get_context("forkserver"))

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
        # A viewer who leaves does not cancel a render others may be waiting for.
        return await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
