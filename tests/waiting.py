"""One way to wait in the tests: poll a condition until it holds, or fail naming it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], what: str, *,
                     timeout: float = 30.0, every: float = 0.05) -> T:
    """Poll ``check`` (plain or async) until it returns something truthy, and return
    that; an AssertionError saying what never happened after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found  # type: ignore[return-value]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(every)


def eventually_blocking(check: Callable[[], T], what: str, *, timeout: float = 30.0,
                        every: float = 0.05) -> T:
    """``eventually`` for a test's thread without an event loop."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return found
