"""The in-process store: dicts. No method awaits, so each is atomic on the event loop."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque

from .base import (
    ANY, HISTORY_DOWNSAMPLE, CapReached, Caps, Claim, RoundRecord, SessionExists, SessionRecord, record_bytes,
)


def _settled(recent: deque) -> None:
    """The newest entry as bytes, if it was given as a ``history.Pending`` (only the newest can be)."""
    if recent and type(recent[-1]) is not bytes:
        recent[-1] = bytes(recent[-1])


class MemoryStore:
    private = True  # this process's own dict
    max_record_bytes = max_round_bytes = None

    def __init__(self, session_ttl_seconds: int = 0) -> None:
        self._ttl = session_ttl_seconds
        # id -> (record, expires at), in expiry order (one TTL for all: a write moves a record last),
        # so expired records are popped from the front
        self._records: OrderedDict[str, tuple[SessionRecord, float]] = OrderedDict()
        self._ids: list[str] = []  # sorted, for paging
        # per session, in expiry order (one TTL for all), so pruning pops from the front
        self._claims: dict[str, OrderedDict[str, tuple[Claim, float]]] = {}
        self._owned: dict[str | None, list[int]] = {}  # owner -> [sessions, bytes]
        self._rounds: dict[str, RoundRecord] = {}
        self._history: dict[str, tuple[deque, deque, list[int]]] = {}  # recent, archive, [dropped]
        self._reserved: dict[str, int] = {}  # what a session may grow by (its history), counted at create
        self._snapshots: dict[str, dict[int, SessionRecord]] = {}  # step -> the record as it was then
        self._bytes = 0

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

    def _purge(self) -> None:
        now = time.monotonic()
        while self._records:
            sid, (_, expires) = next(iter(self._records.items()))
            if expires > now:
                break
            self._drop(sid)

    def _put(self, record: SessionRecord, old: SessionRecord | None, reserve: int = 0) -> None:
        tally = self._owned.setdefault(record.owner, [0, 0])
        delta = record_bytes(record) - (record_bytes(old) if old is not None else 0) + reserve
        if reserve:
            self._reserved[record.id] = reserve
        tally[0] += old is None
        tally[1] += delta
        self._bytes += delta
        self._records[record.id] = (record, self._expiry())
        self._records.move_to_end(record.id)

    def _drop(self, session_id: str) -> None:
        record, _ = self._records.pop(session_id)
        self._ids.pop(bisect.bisect_left(self._ids, session_id))
        self._claims.pop(session_id, None)
        self._rounds.pop(session_id, None)
        self._history.pop(session_id, None)
        self._snapshots.pop(session_id, None)
        tally = self._owned[record.owner]
        freed = record_bytes(record) + self._reserved.pop(session_id, 0)
        tally[0] -= 1
        tally[1] -= freed
        self._bytes -= freed
        if not tally[0]:
            del self._owned[record.owner]

    def _check(self, caps: Caps, record: SessionRecord) -> None:
        needed = record_bytes(record) + caps.reserve
        if len(self._records) >= caps.sessions:
            raise CapReached("sessions", caps.sessions, len(self._records))
        if record.owner is not None:
            count, used = self._owned.get(record.owner, (0, 0))
            if count >= caps.sessions_per_owner:
                raise CapReached("sessions_per_owner", caps.sessions_per_owner, count)
            if used + needed > caps.bytes_per_owner:
                raise CapReached("bytes_per_owner", caps.bytes_per_owner, used, needed)
        if caps.total_bytes is not None and self._bytes + needed > caps.total_bytes:
            raise CapReached("total_bytes", caps.total_bytes, self._bytes, needed)

    async def create(self, record: SessionRecord, caps: Caps | None = None) -> None:
        self._purge()
        if record.id in self._records:
            raise SessionExists(record.id)
        if caps is not None:
            self._check(caps, record)
        self._put(record, None, caps.reserve if caps is not None else 0)
        bisect.insort(self._ids, record.id)

    async def get(self, session_id: str, owner=ANY) -> SessionRecord | None:
        record = self._live(session_id)
        if record is None or (owner is not ANY and record.owner != owner):
            return None
        return record

    async def version(self, session_id: str) -> int | None:
        record = self._live(session_id)
        return None if record is None else record.version

    async def compare_and_set(self, record, expected_version, claim=None, close_round=None, history=None,
                              snapshot=None) -> bool:
        current = self._live(record.id)
        if current is None or current.version != expected_version:
            return False
        if close_round is not None and self._round_version(record.id) != close_round:
            return False
        if claim is not None and not self._claim(record.id, claim):
            return False
        if close_round is not None:
            self._rounds.pop(record.id, None)
        if history is not None:
            self._append(record.id, *history)
        if snapshot is not None:  # the record itself: its bytes are never written again
            step, keep = snapshot
            kept = {s: r for s, r in self._snapshots.get(record.id, {}).items() if s < step}
            kept[step] = record
            self._snapshots[record.id] = dict(sorted(kept.items())[-keep:])
        self._put(record, current)
        return True

    async def get_snapshot(self, session_id: str, step: int) -> SessionRecord | None:
        if self._live(session_id) is None:
            return None
        return self._snapshots.get(session_id, {}).get(step)

    async def snapshot_steps(self, session_id: str) -> list[int]:
        return list(self._snapshots.get(session_id, {})) if self._live(session_id) is not None else []

    def _append(self, session_id: str, entry: bytes, limit: int) -> None:
        kept = self._history.get(session_id)
        if kept is None:
            kept = self._history[session_id] = (deque(), deque(), [0])
        recent, archive, dropped = kept
        _settled(recent)
        recent.append(entry)
        while len(recent) > limit:
            old = recent.popleft()
            dropped[0] += 1
            if dropped[0] % HISTORY_DOWNSAMPLE == 0:
                archive.append(old)
                while len(archive) > limit:
                    archive.popleft()

    async def get_history(self, session_id: str) -> list[bytes]:
        if self._live(session_id) is None or session_id not in self._history:
            return []
        recent, archive, _ = self._history[session_id]
        _settled(recent)
        return [*archive, *recent]

    def _claim(self, session_id: str, claim: Claim) -> bool:
        """Take ``claim`` with the write it comes with; False if its key is taken (a write without
        one takes none: its callers ask only with a claim)."""
        if self._live_claim(session_id, claim.key) is not None:
            return False
        claims = self._claims.setdefault(session_id, OrderedDict())
        claims[claim.key] = (claim, time.monotonic() + claim.ttl_seconds)
        return True

    def _round_version(self, session_id: str) -> int:
        found = self._rounds.get(session_id)
        return 0 if found is None else found.version

    async def get_round(self, session_id: str) -> RoundRecord | None:
        return self._rounds.get(session_id) if self._live(session_id) is not None else None

    async def put_round(self, session_id, round, expected_version, claim=None) -> bool:
        if self._live(session_id) is None or self._round_version(session_id) != expected_version:
            return False
        if claim is not None and not self._claim(session_id, claim):
            return False
        self._rounds[session_id] = round
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
        self._purge()
        return len(self._records)

    async def count_owned(self, owner: str | None) -> int:
        self._purge()
        return self._owned.get(owner, (0, 0))[0]

    async def sweep(self) -> int:
        before = len(self._records)
        self._purge()
        return before - len(self._records)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
