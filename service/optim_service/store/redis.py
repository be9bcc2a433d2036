"""The shared store: Redis, so that replicas on several hosts serve one set of sessions.

A step's compare-and-set is one Lua script (a script is a transaction): it checks the version and
the idempotency key's absence, then moves the staged tensors into place and writes record and claim
with their TTLs together. Every key of a
session shares the hash tag ``{s:ID}``, so the script stays atomic on Redis Cluster. Indexes used only
for listing and counting (by owner, all sessions) are updated beside the script; a crash between the
two can leave an index entry behind, which reads skip and ``sweep`` removes.

Durability is the server's: run Redis with ``appendonly yes`` (docker-compose.yml does).
"""

from __future__ import annotations

import time
import uuid

import redis.asyncio as aioredis

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import Claim, SessionExists, SessionRecord, translate_errors

# The tensors travel to a staging key with a plain SET; the scripts then check and RENAME it into
# place in O(1), so megabytes never pass through Lua's argument copies.
# Both writing scripts end here: the record (KEYS[1]) and its tensors (KEYS[2]) take the session TTL
# (ARGV[4]), or none; RENAME carried the staging key's short TTL over, so PERSIST drops it.
KEEP_SESSION_TTL = """
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4]) redis.call('EXPIRE', KEYS[2], ARGV[4])
else
  redis.call('PERSIST', KEYS[2])
end
return 1
"""
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DEL', KEYS[3]) return 0 end
redis.call('RENAME', KEYS[3], KEYS[2])
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'owner', ARGV[2], 'meta', ARGV[3])
""" + KEEP_SESSION_TTL
COMPARE_AND_SET = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version or version ~= ARGV[1] then redis.call('DEL', KEYS[3]) return 0 end
if ARGV[5] ~= '' then
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('DEL', KEYS[3]) return 0 end
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[6])
  redis.call('ZADD', KEYS[5], ARGV[7] + ARGV[6], KEYS[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[7])
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
redis.call('RENAME', KEYS[3], KEYS[2])
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'meta', ARGV[3])
""" + KEEP_SESSION_TTL
DELETE = """
local claims = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, key in ipairs(claims) do redis.call('DEL', key) end
redis.call('DEL', KEYS[2], KEYS[3])
return redis.call('DEL', KEYS[1])
"""
STAGING_TTL = 60  # a staged copy whose script never ran (the process died) cleans itself up


@translate_errors(RedisConnectionError, RedisTimeoutError)
class RedisStore:
    private = False  # other processes may write the same sessions

    def __init__(self, url: str, session_ttl_seconds: int = 0, prefix: str = "optim"):
        self._redis = aioredis.Redis.from_url(url, decode_responses=False)
        self._ttl = session_ttl_seconds
        self._p = prefix
        self._create = self._redis.register_script(CREATE)
        self._cas = self._redis.register_script(COMPARE_AND_SET)
        self._delete = self._redis.register_script(DELETE)

    def _rec(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:rec"

    def _data(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:data"

    def _staging(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:staging:{uuid.uuid4().hex}"

    async def _stage(self, record: SessionRecord) -> str:
        key = self._staging(record.id)
        await self._redis.set(key, record.data, ex=STAGING_TTL)
        return key

    def _claim(self, sid: str, key: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem:{key}"

    def _claims(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem"

    def _owner_index(self, owner: str | None) -> str:
        return f"{self._p}:owner:{owner or '-'}"

    def _owner_expiry(self, owner: str | None) -> str:
        return f"{self._p}:owner-expiry:{owner or '-'}"

    @property
    def _all(self) -> str:
        return f"{self._p}:sessions"

    async def _touch_indexes(self, record: SessionRecord) -> None:
        expires = time.time() + self._ttl if self._ttl else "+inf"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._all, {record.id: expires})
            pipe.zadd(self._owner_index(record.owner), {record.id: 0})
            pipe.zadd(self._owner_expiry(record.owner), {record.id: expires})
            if self._ttl:  # indexes outlive every session they list, and still expire
                for index in (self._all, self._owner_index(record.owner), self._owner_expiry(record.owner)):
                    pipe.expire(index, 2 * self._ttl)
            await pipe.execute()

    async def create(self, record: SessionRecord) -> None:
        staged = await self._stage(record)
        created = await self._create(keys=[self._rec(record.id), self._data(record.id), staged],
                                     args=[record.version, record.owner or "", record.meta, self._ttl])
        if not created:
            raise SessionExists(record.id)
        await self._touch_indexes(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._redis.pipeline(transaction=True) as pipe:  # MULTI: one consistent snapshot
            pipe.hmget(self._rec(session_id), "version", "owner", "meta")
            pipe.get(self._data(session_id))
            (version, owner, meta), data = await pipe.execute()
        if version is None or data is None:
            return None
        return SessionRecord(session_id, owner.decode() or None, int(version), meta, data)

    async def version(self, session_id: str) -> int | None:
        version = await self._redis.hget(self._rec(session_id), "version")
        return None if version is None else int(version)

    async def compare_and_set(self, record, expected_version, claim: Claim | None = None) -> bool:
        claim_value = f"{claim.body_digest}:{claim.version}:{claim.step}" if claim else ""
        key = claim.key if claim else ""
        staged = await self._stage(record)
        ok = await self._cas(
            keys=[self._rec(record.id), self._data(record.id), staged, self._claim(record.id, key),
                  self._claims(record.id)],
            args=[expected_version, record.version, record.meta, self._ttl,
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
        digest, version, step = value.decode().split(":")
        return Claim(key, digest, int(version), int(step), max(int(ttl), 1))

    async def delete(self, session_id: str) -> bool:
        record = await self.get(session_id)
        deleted = await self._delete(keys=[self._rec(session_id), self._data(session_id), self._claims(session_id)])
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._all, session_id)
            if record is not None:
                pipe.zrem(self._owner_index(record.owner), session_id)
                pipe.zrem(self._owner_expiry(record.owner), session_id)
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

    async def count_owned(self, owner: str | None) -> int:
        return await self._redis.zcount(self._owner_expiry(owner), time.time(), "+inf")

    async def sweep(self) -> int:
        return await self._redis.zremrangebyscore(self._all, "-inf", time.time())

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
