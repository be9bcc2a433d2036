"""A version-checked local cache in front of a remote store, so that the replica serving a hot
session writes its state but does not read it back every step.

Each ``get`` asks the store only for the version (a few bytes); when it matches the cached copy, the
copy is the record. The store's compare-and-set stays the only fence, so a stale copy can cost a
retry but never a lost update. Copies are evicted least-recently-used beyond ``max_bytes``.
"""

from __future__ import annotations

from ..lru import ByteBoundedLRU
from .base import ANY, Caps, Claim, RoundRecord, SessionRecord, SessionStore


class CachedStore:
    private = False  # other processes may write the same sessions

    @property
    def max_record_bytes(self) -> int | None:
        return self.inner.max_record_bytes

    @property
    def max_round_bytes(self) -> int | None:
        return self.inner.max_round_bytes

    def __init__(self, inner: SessionStore, max_bytes: int):
        self.inner = inner
        self._copies: ByteBoundedLRU[SessionRecord] = ByteBoundedLRU(max_bytes)

    def _put(self, record: SessionRecord) -> None:
        self._copies.put(record.id, record, len(record.data) + len(record.meta))

    async def get(self, session_id: str, owner=ANY) -> SessionRecord | None:
        copy = self._copies.get(session_id)
        if copy is not None and owner is not ANY and copy.owner != owner:
            return await self.inner.get(session_id, owner)  # a foreign id costs what a missing one does
        if copy is not None:
            version = await self.inner.version(session_id)
            if version == copy.version:
                return copy
            self._copies.pop(session_id)
            if version is None:
                return None
        record = await self.inner.get(session_id, owner)
        if record is not None:
            self._put(record)
        return record

    async def create(self, record: SessionRecord, caps: Caps | None = None) -> None:
        await self.inner.create(record, caps)
        self._put(record)

    async def compare_and_set(self, record: SessionRecord, expected_version: int, claim: Claim | None = None,
                              close_round: int | None = None, history: tuple[bytes, int] | None = None,
                              snapshot: tuple[int, int] | None = None) -> bool:
        ok = await self.inner.compare_and_set(record, expected_version, claim, close_round, history, snapshot)
        if ok:
            self._put(record)
        else:
            self._copies.pop(record.id)
        return ok

    async def delete(self, session_id: str) -> bool:
        self._copies.pop(session_id)
        return await self.inner.delete(session_id)

    async def version(self, session_id: str) -> int | None:
        return await self.inner.version(session_id)

    async def get_history(self, session_id: str) -> list[bytes]:
        return await self.inner.get_history(session_id)

    async def get_snapshot(self, session_id: str, step: int) -> SessionRecord | None:
        return await self.inner.get_snapshot(session_id, step)

    async def snapshot_steps(self, session_id: str) -> list[int]:
        return await self.inner.snapshot_steps(session_id)

    async def get_round(self, session_id: str) -> RoundRecord | None:
        return await self.inner.get_round(session_id)

    async def put_round(self, session_id: str, round: RoundRecord, expected_version: int,
                        claim: Claim | None = None) -> bool:
        return await self.inner.put_round(session_id, round, expected_version, claim)

    async def get_claim(self, session_id: str, key: str) -> Claim | None:
        return await self.inner.get_claim(session_id, key)

    async def list(self, owner, limit, after):
        return await self.inner.list(owner, limit, after)

    async def count(self) -> int:
        return await self.inner.count()

    async def count_owned(self, owner: str | None) -> int:
        return await self.inner.count_owned(owner)

    async def sweep(self) -> int:
        return await self.inner.sweep()

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        self._copies.clear()
        await self.inner.close()
