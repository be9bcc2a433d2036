"""The shared store: Redis, so that replicas on several hosts serve one set of sessions.

A step's compare-and-set is one Lua script (a script is a transaction): it checks the version and
the idempotency key's absence, then writes record and claim with their TTLs together. Every key of a
session shares the hash tag ``{s:ID}``, so the script stays atomic on Redis Cluster. Indexes used only
for listing and counting (by owner, all sessions) are updated beside the script; a crash between the
two can leave an index entry behind, which reads skip and ``sweep`` removes.

Durability is the server's: run Redis with ``appendonly yes`` (docker-compose.yml does).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from .base import Claim, SessionExists, SessionRecord

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'owner', ARGV[2], 'meta', ARGV[3], 'data', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""
COMPARE_AND_SET = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version or version ~= ARGV[1] then return 0 end
if ARGV[6] ~= '' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[7])
  redis.call('ZADD', KEYS[3], ARGV[8] + ARGV[7], KEYS[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[8])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'meta', ARGV[3], 'data', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""
DELETE = """
local claims = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, key in ipairs(claims) do redis.call('DEL', key) end
redis.call('DEL', KEYS[2])
return redis.call('DEL', KEYS[1])
"""


class RedisStore:
    def __init__(self, url: str, session_ttl_seconds: int = 0, prefix: str = "optim"):
        self._redis = aioredis.Redis.from_url(url, decode_responses=False)
        self._ttl = session_ttl_seconds
        self._p = prefix
        self._create = self._redis.register_script(CREATE)
        self._cas = self._redis.register_script(COMPARE_AND_SET)
        self._delete = self._redis.register_script(DELETE)

    def _rec(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:rec"

    def _claim(self, sid: str, key: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem:{key}"

    def _claims(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem"

    def _owner_index(self, owner: str | None) -> str:
        return f"{self._p}:owner:{owner or '-'}"

    @property
    def _all(self) -> str:
        return f"{self._p}:sessions"

    async def _touch_indexes(self, record: SessionRecord) -> None:
        expires = time.time() + self._ttl if self._ttl else "+inf"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._all, {record.id: expires})
            pipe.zadd(self._owner_index(record.owner), {record.id: 0})
            if self._ttl:  # indexes outlive every session they list, and still expire
                pipe.expire(self._all, 2 * self._ttl)
                pipe.expire(self._owner_index(record.owner), 2 * self._ttl)
            await pipe.execute()

    async def create(self, record: SessionRecord) -> None:
        created = await self._create(keys=[self._rec(record.id)], args=[
            record.version, record.owner or "", record.meta, record.data, self._ttl])
        if not created:
            raise SessionExists(record.id)
        await self._touch_indexes(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        values = await self._redis.hmget(self._rec(session_id), "version", "owner", "meta", "data")
        if values[0] is None:
            return None
        version, owner, meta, data = values
        return SessionRecord(session_id, owner.decode() or None, int(version), meta, data)

    async def compare_and_set(self, record, expected_version, claim: Claim | None = None) -> bool:
        claim_value = f"{claim.body_sha256}:{claim.step}" if claim else ""
        key = claim.key if claim else ""
        ok = await self._cas(
            keys=[self._rec(record.id), self._claim(record.id, key), self._claims(record.id)],
            args=[expected_version, record.version, record.meta, record.data, self._ttl,
                  claim_value, claim.ttl_seconds if claim else 0, int(time.time())],
        )
        if ok:
            await self._touch_indexes(record)
        return bool(ok)

    async def get_claim(self, session_id: str, key: str) -> Claim | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._claim(session_id, key))
            pipe.ttl(self._claim(session_id, key))
            value, ttl = await pipe.execute()
        if value is None:
            return None
        digest, step = value.decode().rsplit(":", 1)
        return Claim(key, digest, int(step), max(int(ttl), 1))

    async def delete(self, session_id: str) -> bool:
        record = await self.get(session_id)
        deleted = await self._delete(keys=[self._rec(session_id), self._claims(session_id)])
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._all, session_id)
            if record is not None:
                pipe.zrem(self._owner_index(record.owner), session_id)
            await pipe.execute()
        return bool(deleted)

    async def list(self, owner, limit, after):
        index = self._owner_index(owner)
        out: list[SessionRecord] = []
        start = f"({after}".encode() if after else b"-"
        while len(out) < limit:
            ids = await self._redis.zrangebylex(index, start, b"+", start=0, num=limit - len(out))
            if not ids:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hmget(self._rec(sid.decode()), "version", "owner", "meta")
                rows = await pipe.execute()
            stale = []
            for sid, (version, rec_owner, meta) in zip(ids, rows):
                if version is None:
                    stale.append(sid)  # expired: drop it from the index as we pass
                else:
                    out.append(SessionRecord(sid.decode(), rec_owner.decode() or None, int(version), meta, b""))
            if stale:
                await self._redis.zrem(index, *stale)
            start = b"(" + ids[-1]
        return out

    async def count(self) -> int:
        return await self._redis.zcount(self._all, time.time(), "+inf")

    async def sweep(self) -> int:
        return await self._redis.zremrangebyscore(self._all, "-inf", time.time())

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
