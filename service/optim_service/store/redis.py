"""The shared store: Redis or Redis Cluster, so that replicas on several hosts serve one set of
sessions (``redis://host:port/db``, ``redis+cluster://host:port[,host:port...]``).

A step's compare-and-set is one Lua script (a script is a transaction): it checks the version and
the idempotency key's absence, then moves the staged tensors into place and writes record and claim
with their TTLs together. Every key of a session shares the hash tag ``{s:ID}``, so the script stays
atomic on Redis Cluster; a session's data is kept in chunks (``CHUNK_BYTES``) under that tag.

Caps are reservations, each taken by one script on the keys it counts: an owner's sessions and
their bytes (hash tag ``{o:OWNER}``), then all sessions. A create reserves, then writes the record,
and gives back what it reserved when any part fails; so concurrent creates on any number of replicas
never pass a cap, on one Redis or a cluster (where one script cannot reach keys of several slots). A
process killed between a reservation and its record leaves a reservation that counts until its
expiry: caps err on the side of refusing. The listing index is updated beside the scripts; a crash
between the two can leave an entry behind, which reads skip and ``sweep`` removes.

Durability is the server's: run Redis with ``appendonly yes`` (docker-compose.yml does); with
``wait_replicas`` a write is acknowledged once replicas have it too (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (
    ANY, HISTORY_DOWNSAMPLE, CapReached, Caps, Claim, OutcomeUnknown, RoundRecord, SessionExists, SessionRecord,
    record_bytes, translate_errors, wrap_methods,
)

# The tensors travel to staging keys with plain SETs; the scripts then check and RENAME them into
# place in O(1), so megabytes never pass through Lua's argument copies. A Redis value holds at most
# 512 MB, so a record's data is split into chunks of CHUNK_BYTES: chunk 0 is ``data``, chunk i
# ``data:i`` (same hash tag, same shard); the record hash counts them (``chunks``).
# A record (a hash) and its data, just renamed from staging keys, take the session TTL, or none:
# RENAME carried the staging keys' short TTL over, so PERSIST drops it.
KEEP_TTL = """
local function chunk(key, i) if i == 0 then return key end return key .. ':' .. i end
local function drop_staged(staging, n)
  for i = 0, tonumber(n) - 1 do redis.call('DEL', chunk(staging, i)) end
end
local function place(staging, data, n, old)
  n = tonumber(n)
  for i = 0, n - 1 do redis.call('RENAME', chunk(staging, i), chunk(data, i)) end
  for i = n, (tonumber(old) or 1) - 1 do redis.call('DEL', chunk(data, i)) end
end
local function keep_ttl(record, data, ttl, n)
  n = tonumber(n or 1)
  if tonumber(ttl) > 0 then
    redis.call('EXPIRE', record, ttl)
    for i = 0, n - 1 do redis.call('EXPIRE', chunk(data, i), ttl) end
  else
    for i = 0, n - 1 do redis.call('PERSIST', chunk(data, i)) end
  end
  return 1
end
"""
# Both session-writing scripts end here: the record (KEYS[1]) and its tensors (KEYS[2]), TTL ARGV[4],
# chunks ARGV[5].
KEEP_SESSION_TTL = """
return keep_ttl(KEYS[1], KEYS[2], ARGV[4], ARGV[5])
"""
CREATE = KEEP_TTL + """
if redis.call('EXISTS', KEYS[1]) == 1 then drop_staged(KEYS[3], ARGV[5]) return 0 end
place(KEYS[3], KEYS[2], ARGV[5], 1)
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'owner', ARGV[2], 'meta', ARGV[3], 'chunks', ARGV[5])
""" + KEEP_SESSION_TTL
# An idempotency claim (key, its session's index of claims, value, TTL, now): false when the key is
# claimed already; the scripts check it before they write anything else.
CLAIM = KEEP_TTL + """
local function claimed(key, index, value, ttl, now)
  if value == '' then return false end
  if redis.call('EXISTS', key) == 1 then return true end
  redis.call('SET', key, value, 'EX', ttl)
  redis.call('ZADD', index, now + ttl, key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  redis.call('EXPIRE', index, ttl)
  return false
end
local function round_version(key) return redis.call('HGET', key, 'version') or '0' end
local function drop_snapshot(prefix, step)
  local n = redis.call('HGET', prefix .. step .. ':meta', 'chunks') or '1'
  for i = 0, tonumber(n) - 1 do redis.call('DEL', chunk(prefix .. step, i)) end
  redis.call('DEL', prefix .. step .. ':meta')
end
"""
# ARGV[5]: the new data's chunks; ARGV[9]: '' leaves the round alone; else the open round's version
# (0: none) must match, and it closes
COMPARE_AND_SET = CLAIM + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version or version ~= ARGV[1] then drop_staged(KEYS[3], ARGV[5]) return 0 end
if ARGV[9] ~= '' and round_version(KEYS[6]) ~= ARGV[9] then drop_staged(KEYS[3], ARGV[5]) return 0 end
if claimed(KEYS[4], KEYS[5], ARGV[6], ARGV[7], ARGV[8]) then drop_staged(KEYS[3], ARGV[5]) return 0 end
if ARGV[9] ~= '' then redis.call('DEL', KEYS[6], KEYS[7]) end
if ARGV[10] ~= '' then
  local limit = tonumber(ARGV[11])
  redis.call('RPUSH', KEYS[8], ARGV[10])
  while redis.call('LLEN', KEYS[8]) > limit do
    local old = redis.call('LPOP', KEYS[8])
    if redis.call('INCR', KEYS[10]) % """ + str(HISTORY_DOWNSAMPLE) + """ == 0 then
      redis.call('RPUSH', KEYS[9], old)
      redis.call('LTRIM', KEYS[9], -limit, -1)
    end
  end
  if tonumber(ARGV[4]) > 0 then
    for i = 8, 10 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
  end
end
place(KEYS[3], KEYS[2], ARGV[5], redis.call('HGET', KEYS[1], 'chunks'))
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'meta', ARGV[3], 'chunks', ARGV[5])
if ARGV[12] ~= '' then
  local step, keep, prefix, n = tonumber(ARGV[12]), tonumber(ARGV[13]), ARGV[14], tonumber(ARGV[5])
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[11], step, '+inf')) do drop_snapshot(prefix, old) end
  redis.call('ZREMRANGEBYSCORE', KEYS[11], step, '+inf')
  for i = 0, n - 1 do redis.call('COPY', chunk(KEYS[2], i), chunk(prefix .. step, i), 'REPLACE') end
  redis.call('HSET', prefix .. step .. ':meta', 'version', ARGV[2], 'meta', ARGV[3], 'chunks', n)
  redis.call('ZADD', KEYS[11], step, step)
  while redis.call('ZCARD', KEYS[11]) > keep do
    local gone = redis.call('ZPOPMIN', KEYS[11])
    drop_snapshot(prefix, gone[1])
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call('EXPIRE', KEYS[11], ARGV[4])
    keep_ttl(prefix .. step .. ':meta', prefix .. step, ARGV[4], n)
  end
end
""" + KEEP_SESSION_TTL
# KEYS: the session's record, its round, the round's sum, the staged sum, claim, claims.
# ARGV: expected round version (0: none), new version, meta, session TTL, claim value, claim TTL, now.
PUT_ROUND = CLAIM + """
if redis.call('EXISTS', KEYS[1]) == 0 or round_version(KEYS[2]) ~= ARGV[1] then
  redis.call('DEL', KEYS[4]) return 0
end
if claimed(KEYS[5], KEYS[6], ARGV[5], ARGV[6], ARGV[7]) then redis.call('DEL', KEYS[4]) return 0 end
redis.call('RENAME', KEYS[4], KEYS[3])
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'meta', ARGV[3])
return keep_ttl(KEYS[2], KEYS[3], ARGV[4])
"""
DELETE = CLAIM + """
for _, step in ipairs(redis.call('ZRANGE', KEYS[#KEYS], 0, -1)) do drop_snapshot(ARGV[1], step) end
for i = 1, tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') - 1 do redis.call('DEL', chunk(KEYS[2], i)) end
local claims = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, key in ipairs(claims) do redis.call('DEL', key) end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
return redis.call('DEL', KEYS[1])
"""
# KEYS: an index (sorted set: id -> expiry) and, for an owner, its sizes (hash: id -> bytes).
# ARGV: id, expiry, bytes, max sessions, max bytes, now, index TTL (0: none).
# Returns {1}, {2} when the id is already reserved, or {0, count} / {-1, bytes used} when a cap refuses.
RESERVE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[6])
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[6])
  if KEYS[2] then for _, sid in ipairs(expired) do redis.call('HDEL', KEYS[2], sid) end end
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {2} end
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[4]) then return {0, count} end
if KEYS[2] then
  local used = 0
  for _, n in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(n) end
  if used + tonumber(ARGV[3]) > tonumber(ARGV[5]) then return {-1, used} end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if tonumber(ARGV[7]) > 0 then
  for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[7]) end
end
return {1}
"""
UNLIMITED = 1 << 62
STAGING_TTL = 60  # a staged copy whose script never ran (the process died) cleans itself up
CHUNK_BYTES = 64 << 20  # a record's data in values of at most this (Redis caps one at 512 MB)
MAX_VALUE_BYTES = 512 << 20  # proto-max-bulk-len: a round's sum is one value


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis+cluster://[user:password@]host:port[,host:port...]``: the seed nodes, user and
    password. ValueError, saying what is wrong, for anything else."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES or not rest:
        raise ValueError("not a cluster URL: use redis+cluster://host:port[,host:port...]")
    userinfo, _, hosts = rest.split("/", 1)[0].rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {hostport!r} is not host:port; use redis+cluster://host:port[,host:port...]")
        nodes.append((host, int(port)))
    return nodes, unquote(user) or None, unquote(password) or None


def primed(cls):
    """Decorate a class over a Redis client (``self._redis``) so that its first call on a cluster
    client pings every node before any other runs: 40 concurrent first calls on a fresh
    redis-py 8.1 cluster client failed a quarter of the time here ('NoneType' object has no
    attribute 'writelines', opening connections), and some scripts then ran twice."""
    def around(fn):
        async def method(self, *args, **kwargs):
            if self.__dict__.get("_primed") is not True:
                async with self.__dict__.setdefault("_priming", asyncio.Lock()):
                    if self.__dict__.get("_primed") is not True:
                        if isinstance(self._redis, RedisCluster):
                            await self._redis.ping()
                        self._primed = True
            return await fn(self, *args, **kwargs)
        return method
    return wrap_methods(cls, around, skip=("close",))


def riding_failovers(cls):
    """Decorate a class over a Redis client (``self._redis``, its timeout ``self._timeout``) so that on
    a cluster a call whose connection was refused is tried again, after a jittered backoff, for up to
    ¾ of that timeout: a master is down, and its replica's promotion may not be in every node's view
    yet. A refused connection sent nothing, so any call may be tried again. redis-py's cluster client
    tries 4 times in ~0.1 s with no pause, and a test in CI saw all 4 refused by a master that had
    been replaced (each refresh of its map still named the old one)."""
    def around(fn):
        async def method(self, *args, **kwargs):
            if not isinstance(self._redis, RedisCluster):
                return await fn(self, *args, **kwargs)
            deadline, pause = time.monotonic() + 0.75 * self._timeout, 0.02
            while True:
                try:
                    return await fn(self, *args, **kwargs)
                except RedisConnectionError as e:
                    wait = random.uniform(pause / 2, pause)
                    if not _refused(e) or time.monotonic() + wait > deadline:
                        raise
                await asyncio.sleep(wait)
                pause = min(2 * pause, 0.5)
        return method
    return wrap_methods(cls, around, skip=("close",))


def _refused(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, ConnectionRefusedError):
            return True
        error = error.__cause__ or error.__context__
    return False


def connect(url: str, timeout_seconds: float) -> aioredis.Redis | RedisCluster:
    """A client whose every wait is bounded here, whatever the library's defaults (redis-py 5 waits
    forever, 8 five seconds), retrying once at once: a restarted Redis leaves dropped connections in
    the pool. A cluster URL gives redis-py's cluster client, which follows MOVED and ASK and learns a
    failover's new master."""
    if url.partition("://")[0] in CLUSTER_SCHEMES:
        nodes, user, password = cluster_nodes(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user, password=password,
                            ssl=url.startswith("rediss"), decode_responses=False, socket_timeout=timeout_seconds,
                            socket_connect_timeout=timeout_seconds)
    return aioredis.Redis.from_url(url, decode_responses=False, socket_timeout=timeout_seconds,
                                   socket_connect_timeout=timeout_seconds, retry=Retry(NoBackoff(), 1))


@translate_errors(RedisConnectionError, RedisTimeoutError, ClusterError)
@primed
@riding_failovers
class RedisStore:
    """``wait_replicas`` > 0: a write (a create, a step, a round's contribution) is acknowledged only
    once that many replicas of its master have it (``WAIT``, within half the store timeout), so a
    failover that promotes one of them loses none; fewer in time raise ``OutcomeUnknown`` (the write
    may stand or be lost: retry with the same Idempotency-Key)."""

    private = False  # other processes may write the same sessions
    max_record_bytes = None  # chunked: any size
    max_round_bytes = MAX_VALUE_BYTES

    def __init__(self, url: str, session_ttl_seconds: int = 0, prefix: str = "optim",
                 timeout_seconds: float = 5.0, wait_replicas: int = 0, chunk_bytes: int = CHUNK_BYTES):
        self._redis = connect(url, timeout_seconds)
        self._timeout = timeout_seconds
        self._cluster = isinstance(self._redis, RedisCluster)
        self._ttl = session_ttl_seconds
        self._p = prefix
        self._wait = (wait_replicas, max(1, int(timeout_seconds * 500)))
        self._chunk = chunk_bytes
        self._create = self._redis.register_script(CREATE)
        self._cas = self._redis.register_script(COMPARE_AND_SET)
        self._delete = self._redis.register_script(DELETE)
        self._reserve = self._redis.register_script(RESERVE)
        self._put_round = self._redis.register_script(PUT_ROUND)

    async def _write(self, script, keys: list, args: list):
        """Run a writing script; with ``wait_replicas``, on one connection followed by ``WAIT`` (which
        counts what that connection wrote), sending the script's text: a promoted replica has no
        cache of scripts loaded on its old master."""
        replicas, timeout_ms = self._wait
        if not replicas:
            return await script(keys=keys, args=args)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(script.script, len(keys), *keys, *args)
            on = {"target_nodes": self._redis.get_node_from_key(keys[0])} if self._cluster else {}
            pipe.execute_command("WAIT", replicas, timeout_ms, **on)
            written, acknowledged = await pipe.execute()
        if written and acknowledged < replicas:
            raise OutcomeUnknown(f"the write reached {acknowledged} of the {replicas} replicas asked for "
                                 f"(OPTIM_REDIS_WAIT_REPLICAS) within {timeout_ms} ms; it may be lost in a failover")
        return written

    def _rec(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:rec"

    def _data(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:data"

    def _round(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:round"

    def _round_data(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:round-data"

    def _staging(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:staging:{uuid.uuid4().hex}"

    async def _stage(self, record: SessionRecord) -> tuple[str, int]:
        """The record's data in staging keys, chunk i at ``key:i`` (0 at ``key``); the key and the count."""
        data, size = memoryview(record.data).cast("B"), self._chunk
        count = max(1, -(-len(data) // size))
        if count == 1:
            return await self._stage_bytes(record.id, record.data), 1
        key = self._staging(record.id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.set(f"{key}:{i}" if i else key, data[i * size:(i + 1) * size], ex=STAGING_TTL)
            await pipe.execute()
        return key, count

    async def _chunks(self, key: str, version_key: str, version: bytes, count: int) -> list[bytes] | None:
        """Chunks 1.. of ``key`` in one snapshot, or None when ``version_key`` no longer says ``version``
        (a write came between this read and the first chunk's: read again)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(version_key, "version")
            for i in range(1, count):
                pipe.get(f"{key}:{i}")
            now, *rest = await pipe.execute()
        return rest if now == version and all(c is not None for c in rest) else None

    async def _stage_bytes(self, sid: str, data) -> str:
        key = self._staging(sid)
        await self._redis.set(key, data, ex=STAGING_TTL)
        return key

    def _claim(self, sid: str, key: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem:{key}"

    def _claims(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:idem"

    def _owner_index(self, owner: str | None) -> str:
        return f"{self._p}:owner:{owner or '-'}"

    def _owner_sessions(self, owner: str | None) -> str:
        return f"{self._p}:{{o:{owner or '-'}}}:sessions"

    def _owner_bytes(self, owner: str | None) -> str:
        return f"{self._p}:{{o:{owner or '-'}}}:bytes"

    @property
    def _all(self) -> str:
        return f"{self._p}:sessions"

    def _expires(self) -> float | str:
        return time.time() + self._ttl if self._ttl else "+inf"

    async def _touch_indexes(self, record: SessionRecord) -> None:
        expires = self._expires()
        async with self._redis.pipeline(transaction=False) as pipe:
            # xx: a session deleted meanwhile is not counted again
            pipe.zadd(self._all, {record.id: expires}, xx=True)
            pipe.zadd(self._owner_sessions(record.owner), {record.id: expires}, xx=True)
            pipe.zadd(self._owner_index(record.owner), {record.id: 0})
            if self._ttl:  # indexes outlive every session they list, and still expire
                for index in (self._all, self._owner_index(record.owner), self._owner_sessions(record.owner),
                              self._owner_bytes(record.owner)):
                    pipe.expire(index, 2 * self._ttl)
            await pipe.execute()

    async def _release(self, session_id: str, owner: str | None) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._all, session_id)
            pipe.zrem(self._owner_sessions(owner), session_id)
            pipe.hdel(self._owner_bytes(owner), session_id)
            pipe.zrem(self._owner_index(owner), session_id)
            await pipe.execute()

    async def create(self, record: SessionRecord, caps: Caps | None = None) -> None:
        owner, now = record.owner, time.time()
        nbytes = record_bytes(record) + (caps.reserve if caps is not None else 0)
        index_ttl = 2 * self._ttl if self._ttl else 0
        per_owner = caps is not None and owner is not None
        verdict = await self._reserve(
            keys=[self._owner_sessions(owner), self._owner_bytes(owner)],
            args=[record.id, self._expires(), nbytes, caps.sessions_per_owner if per_owner else UNLIMITED,
                  caps.bytes_per_owner if per_owner else UNLIMITED, now, index_ttl])
        if verdict[0] == 2:
            raise SessionExists(record.id)
        if verdict[0] == 0:
            raise CapReached("sessions_per_owner", caps.sessions_per_owner, int(verdict[1]))
        if verdict[0] == -1:
            raise CapReached("bytes_per_owner", caps.bytes_per_owner, int(verdict[1]), nbytes)
        try:
            verdict = await self._reserve(
                keys=[self._all], args=[record.id, self._expires(), nbytes,
                                        caps.sessions if caps else UNLIMITED, UNLIMITED, now, index_ttl])
            if verdict[0] == 0:
                raise CapReached("sessions", caps.sessions, int(verdict[1]))
            staged, count = await self._stage(record)
            created = await self._write(self._create, [self._rec(record.id), self._data(record.id), staged],
                                        [record.version, owner or "", record.meta, self._ttl, count])
            if not created:
                raise SessionExists(record.id)
        except BaseException:
            await self._release(record.id, owner)
            raise
        await self._touch_indexes(record)

    async def get(self, session_id: str, owner=ANY) -> SessionRecord | None:
        if owner is not ANY:  # the owner is checked before the tensors are read
            found = await self._redis.hget(self._rec(session_id), "owner")
            if found is None or (found.decode() or None) != owner:
                return None
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:  # MULTI: one consistent snapshot
                pipe.hmget(self._rec(session_id), "version", "owner", "meta", "chunks")
                pipe.get(self._data(session_id))
                (version, found, meta, chunks), data = await pipe.execute()
            if version is None or data is None:
                return None
            if int(chunks or 1) == 1:
                break
            rest = await self._chunks(self._data(session_id), self._rec(session_id), version, int(chunks))
            if rest is not None:
                data = b"".join((data, *rest))
                break
        found = found.decode() or None
        if owner is not ANY and found != owner:
            return None
        return SessionRecord(session_id, found, int(version), meta, data)

    async def version(self, session_id: str) -> int | None:
        version = await self._redis.hget(self._rec(session_id), "version")
        return None if version is None else int(version)

    async def compare_and_set(self, record, expected_version, claim: Claim | None = None,
                              close_round: int | None = None, history: tuple[bytes, int] | None = None,
                              snapshot: tuple[int, int] | None = None) -> bool:
        staged, count = await self._stage(record)
        sid = record.id
        ok = await self._write(
            self._cas,
            [self._rec(sid), self._data(sid), staged, self._claim(sid, claim.key if claim else ""),
             self._claims(sid), self._round(sid), self._round_data(sid), *self._history_keys(sid), self._snaps(sid)],
            [expected_version, record.version, record.meta, self._ttl, count, *_claim_args(claim),
             "" if close_round is None else close_round, *(history or ("", 0)),
             *(snapshot or ("", 0)), self._snap_prefix(sid)],
        )
        if ok:
            await self._touch_indexes(record)
        return bool(ok)

    def _history_keys(self, sid: str) -> list[str]:
        return [f"{self._p}:{{s:{sid}}}:history", f"{self._p}:{{s:{sid}}}:history-archive",
                f"{self._p}:{{s:{sid}}}:history-dropped"]

    def _snaps(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:snaps"

    def _snap_prefix(self, sid: str) -> str:
        return f"{self._p}:{{s:{sid}}}:snap:"

    async def get_snapshot(self, session_id: str, step: int) -> SessionRecord | None:
        key = f"{self._snap_prefix(session_id)}{step}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._rec(session_id), "owner")
            pipe.hmget(key + ":meta", "version", "meta", "chunks")
            pipe.get(key)
            owner, (version, meta, chunks), data = await pipe.execute()
        if owner is None or version is None or data is None:
            return None
        if int(chunks or 1) > 1:  # a snapshot never changes once kept: only its going matters
            rest = await self._chunks(key, key + ":meta", version, int(chunks))
            if rest is None:
                return None
            data = b"".join((data, *rest))
        return SessionRecord(session_id, owner.decode() or None, int(version), meta, data)

    async def snapshot_steps(self, session_id: str) -> list[int]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self._rec(session_id))
            pipe.zrange(self._snaps(session_id), 0, -1)
            alive, steps = await pipe.execute()
        return [int(s) for s in steps] if alive else []

    async def get_history(self, session_id: str) -> list[bytes]:
        recent, archive, _ = self._history_keys(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self._rec(session_id))
            pipe.lrange(archive, 0, -1)
            pipe.lrange(recent, 0, -1)
            alive, old, new = await pipe.execute()
        return [*old, *new] if alive else []

    async def get_round(self, session_id: str) -> RoundRecord | None:
        async with self._redis.pipeline(transaction=True) as pipe:  # MULTI: one consistent snapshot
            pipe.exists(self._rec(session_id))
            pipe.hmget(self._round(session_id), "version", "meta")
            pipe.get(self._round_data(session_id))
            alive, (version, meta), data = await pipe.execute()
        if not alive or version is None or data is None:
            return None
        return RoundRecord(int(version), meta, data)

    async def put_round(self, session_id: str, round: RoundRecord, expected_version: int,
                        claim: Claim | None = None) -> bool:
        staged = await self._stage_bytes(session_id, round.data)
        ok = await self._write(
            self._put_round,
            [self._rec(session_id), self._round(session_id), self._round_data(session_id), staged,
             self._claim(session_id, claim.key if claim else ""), self._claims(session_id)],
            [expected_version, round.version, round.meta, self._ttl, *_claim_args(claim)])
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
        owner = await self._redis.hget(self._rec(session_id), "owner")
        deleted = await self._delete(keys=[self._rec(session_id), self._data(session_id), self._claims(session_id),
                                           self._round(session_id), self._round_data(session_id),
                                           *self._history_keys(session_id), self._snaps(session_id)],
                                     args=[self._snap_prefix(session_id)])
        if owner is not None:
            await self._release(session_id, owner.decode() or None)
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
        return await self._redis.zcount(self._owner_sessions(owner), time.time(), "+inf")

    async def sweep(self) -> int:
        return await self._redis.zremrangebyscore(self._all, "-inf", time.time())

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


def _claim_args(claim: Claim | None) -> list:
    """A claim as the scripts take it: its value, TTL and the time now ('' for none)."""
    if claim is None:
        return ["", 0, int(time.time())]
    return [f"{claim.body_digest}:{claim.version}:{claim.step}", claim.ttl_seconds, int(time.time())]
