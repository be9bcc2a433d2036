"""The in-process store: dicts. No method awaits, so each is atomic on the event loop."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict

from .base import Claim, SessionExists, SessionRecord


class MemoryStore:
    private = True  # this process's own dict

    def __init__(self, session_ttl_seconds: int = 0) -> None:
        self._ttl = session_ttl_seconds
        self._records: dict[str, tuple[SessionRecord, float]] = {}  # id -> (record, expires at)
        self._ids: list[str] = []  # sorted, for paging
        # per session, in expiry order (one TTL for all), so pruning pops from the front
        self._claims: dict[str, OrderedDict[str, tuple[Claim, float]]] = {}

    def _expiry(self) -> float:
        return time.monotonic() + self._ttl if self._ttl else float("inf")

    def _live(self, session_id: str) -> SessionRecord | None:
        entry = self._records.get(session_id)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self._drop(session_id)
            return None
        return entry[0]

    def _drop(self, session_id: str) -> None:
        del self._records[session_id]
        self._ids.pop(bisect.bisect_left(self._ids, session_id))
        self._claims.pop(session_id, None)

    async def create(self, record: SessionRecord) -> None:
        if self._live(record.id) is not None:
            raise SessionExists(record.id)
        self._records[record.id] = (record, self._expiry())
        bisect.insort(self._ids, record.id)

    async def get(self, session_id: str) -> SessionRecord | None:
        return self._live(session_id)

    async def version(self, session_id: str) -> int | None:
        record = self._live(session_id)
        return None if record is None else record.version

    async def compare_and_set(self, record, expected_version, claim=None) -> bool:
        current = self._live(record.id)
        if current is None or current.version != expected_version:
            return False
        if claim is not None:
            if self._live_claim(record.id, claim.key) is not None:
                return False
            claims = self._claims.setdefault(record.id, OrderedDict())
            claims[claim.key] = (claim, time.monotonic() + claim.ttl_seconds)
        self._records[record.id] = (record, self._expiry())
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
        if self._live(session_id) is None:
            return False
        self._drop(session_id)
        return True

    async def list(self, owner, limit, after):
        start = bisect.bisect_right(self._ids, after) if after else 0
        out = []
        for sid in self._ids[start:]:
            record, expires = self._records[sid]
            if record.owner == owner and expires > time.monotonic():
                out.append(record)
                if len(out) == limit:
                    break
        return out

    async def count(self) -> int:
        return sum(1 for _, expires in self._records.values() if expires > time.monotonic())

    async def count_owned(self, owner: str | None) -> int:
        now = time.monotonic()
        return sum(1 for r, expires in self._records.values() if r.owner == owner and expires > now)

    async def sweep(self) -> int:
        now = time.monotonic()
        expired = [sid for sid, (_, expires) in self._records.items() if expires <= now]
        for sid in expired:
            self._drop(sid)
        return len(expired)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
