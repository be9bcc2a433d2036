"""A least-recently-used map bounded by the bytes its values hold: the local record cache in front of
a remote store and the decoded sessions a step forks from both keep one."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Iterator, TypeVar

V = TypeVar("V")


class ByteBoundedLRU(Generic[V]):
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def get(self, key: str) -> V | None:
        """The value, now the most recently used; None if absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V, size: int) -> V | None:
        """Keep ``value`` (replacing ``key``'s, which it returns), evicting the least recently used
        beyond the bound; a value larger than the whole bound is not kept."""
        replaced = self.pop(key)
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            self.bytes += size
        while self.bytes > self.max_bytes:
            self.pop(next(iter(self._entries)))
        return replaced

    def pop(self, key: str) -> V | None:
        """Drop ``key``'s value, and return it (None if absent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def keys(self) -> list[str]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __iter__(self) -> Iterator[str]:
        """Keys, least recently used first."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
