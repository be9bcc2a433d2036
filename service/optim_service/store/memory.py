"""The in-process store: a dict. Each method runs without awaiting, so it is atomic on the event loop."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict

from .base import Claim, SessionExists, SessionRecord


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._ids: list[str] = []  # sorted, for paging
        # per session, in expiry order (one TTL for all), so pruning pops from the front
        self._claims: dict[str, OrderedDict[str, tuple[Claim, float]]] = {}

    async def create(self, record: SessionRecord) -> None:
        if record.id in self._records:
            raise SessionExists(record.id)
        self._records[record.id] = record
        bisect.insort(self._ids, record.id)

    async def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    async def compare_and_set(self, record, expected_version, claim=None) -> bool:
        current = self._records.get(record.id)
        if current is None or current.version != expected_version:
            return False
        if claim is not None:
            if self._live_claim(record.id, claim.key) is not None:
                return False
            claims = self._claims.setdefault(record.id, OrderedDict())
            claims[claim.key] = (claim, time.monotonic() + claim.ttl_seconds)
        self._records[record.id] = record
        return True

    async def get_claim(self, session_id: str, key: str) -> Claim | None:
        return self._live_claim(session_id, key)

    def _live_claim(self, session_id: str, key: str) -> Claim | None:
        claims = self._claims.get(session_id)
        if not claims:
            return None
        now = time.monotonic()
        while claims and next(iter(claims.values()))[1] <= now:
            claims.popitem(last=False)
        entry = claims.get(key)
        return entry[0] if entry else None

    async def delete(self, session_id: str) -> bool:
        if self._records.pop(session_id, None) is None:
            return False
        self._ids.pop(bisect.bisect_left(self._ids, session_id))
        self._claims.pop(session_id, None)
        return True

    async def list(self, owner, limit, after):
        start = bisect.bisect_right(self._ids, after) if after else 0
        out = []
        for sid in self._ids[start:]:
            record = self._records[sid]
            if record.owner == owner:
                out.append(record)
                if len(out) == limit:
                    break
        return out

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self._claims.clear()
        self._ids.clear()
