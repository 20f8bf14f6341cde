"""Ready answers for viewed pages and thumbnails, in memory, most recent first: a
campaign's repeat views (and mail proxies) cost a dictionary look-up, not a token
decode, a row read and a file open."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

HOT_BYTES = 64 * 1024 * 1024  # pages and thumbnails kept in memory, most recent first
HOT_SECONDS = 3600.0  # a kept answer is recomputed at least this often


@dataclass(frozen=True)
class Hot:
    body: bytes
    headers: Mapping[str, str]
    etag: str
    until: datetime  # the link's expiry, or sooner


class HotCache:
    """Ready answers for pages and thumbnails by (route, token): a viewed link's next
    view costs a dict look-up, not a decode, a row read and a file open."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._items: OrderedDict[tuple[str, str], Hot] = OrderedDict()

    def get(self, key: tuple[str, str], now: datetime) -> Hot | None:
        hot = self._items.get(key)
        if hot is None:
            return None
        if hot.until <= now:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return hot

    def put(self, key: tuple[str, str], hot: Hot) -> None:
        self._drop(key)
        self._items[key] = hot
        self._size += len(hot.body)
        while self._size > self._max and self._items:
            self._drop(next(iter(self._items)))

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old.body)

    def clear(self) -> None:
        self._items.clear()
        self._size = 0
