"""The JSON nesting depth of a body, checked before it is parsed (its size is ``negotiation.read_body``'s)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidRequest

_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def count_byte(body: bytes, char: bytes) -> int:
    """How many times the one byte ``char`` occurs in ``body``: numpy's compare vectorises, where
    bytes.count goes byte by byte; below 64 KiB numpy's calls cost more than they save."""
    if len(body) < 1 << 16:
        return body.count(char)
    return int(np.count_nonzero(np.frombuffer(body, np.uint8) == ord(char)))


def check_json_depth(body: bytes, limit: int) -> None:
    """Nesting of arrays/objects, outside strings, counted over the raw bytes in one numpy pass."""
    if count_byte(body, b"[") + count_byte(body, b"{") <= limit:  # cannot nest deeper than it has brackets
        return
    raw = np.frombuffer(body, np.uint8)
    if raw.size == 0:
        return
    quotes = raw == ord('"')
    if quotes.any():
        # a quote is escaped when an odd run of backslashes precedes it
        backslash = (raw == ord("\\")).astype(np.int64)
        run = np.cumsum(backslash)
        reset = np.maximum.accumulate(np.where(backslash == 0, run, 0))
        preceding = np.concatenate(([0], (run - reset)[:-1]))
        quotes &= preceding % 2 == 0
        inside = (np.cumsum(quotes) - quotes) % 2 == 1
        steps = np.where(inside, 0, _OPEN[raw])
    else:
        steps = _OPEN[raw]
    if int(np.cumsum(steps, dtype=np.int64).max()) > limit:
        raise InvalidRequest(f"JSON nested deeper than {limit} levels")
