"""One loop for every spool: take entries in order, handle each in a worker thread.

What a previous run accepted but did not finish is queued first (``pending``); new
entries arrive through ``submit`` from the event loop or from another thread. A
failure is logged and the entry stays in its spool, to be tried again at next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("purlgate.worker")


class QueueWorker(Generic[T]):
    def __init__(self, name: str, *, handle: Callable[[T], None],
                 pending: Callable[[], Sequence[T]]) -> None:
        self.name = name
        self._handle = handle
        self._pending = pending
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: T) -> None:
        """Hand over an entry (from the loop or from another thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put_nowait(item)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        for item in self._pending():
            self._queue.put_nowait(item)
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                break
            item = getter.result()
            try:
                await asyncio.to_thread(self._handle, item)
            except Exception:
                log.exception("%s: an entry could not be handled; kept for retry", self.name)
