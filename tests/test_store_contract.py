"""ONE contract, run against every backend: memory, SQLite, and a real Redis started by the tests."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid

import pytest
import redis.asyncio as aioredis

from optim_service.store import (
    CachedStore, CapReached, Caps, Claim, MemoryStore, RoundRecord, SessionExists, SessionRecord, open_store,
)
from optim_service.store.redis import RedisStore

BACKENDS = ["memory", "sqlite", "redis", "sqlite+cache", "redis+cache", "cluster", "cluster+wait"]
CHUNK = 4096  # Redis keeps a record's data in values of at most this here: every test crosses chunks


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """A factory of fresh, isolated stores of one backend (each Redis store gets its own prefix);
    ``cluster`` is a real 3-master Redis Cluster with a replica each, ``+wait`` waits for that replica."""

    backend, _, cache = request.param.partition("+")
    if backend == "cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
        wait, cache = cache == "wait", ""
    elif backend == "redis":
        redis_url, wait = request.getfixturevalue("redis_url"), False
    sqlite_path = f"{tmp_path}/{uuid.uuid4().hex}.db"
    prefix = f"test-{uuid.uuid4().hex}"

    def make(ttl: int = 0):
        """Every store a test makes shares one backend instance's data, like replicas do."""
        if backend == "memory":
            return open_store("memory", ttl)
        store = (open_store(f"sqlite:///{sqlite_path}", ttl) if backend == "sqlite"
                 else RedisStore(redis_url, ttl, prefix=prefix, wait_replicas=int(wait), chunk_bytes=CHUNK))
        return CachedStore(store, 1 << 30) if cache else store

    return make


def record(sid="s1", owner="alice", version=0, data=b"\x00\x01" * 8):
    return SessionRecord(sid, owner, version, b'{"m": %d}' % version, data)


async def test_create_get_round_trip_and_duplicates(make_store):
    store = make_store()
    big = os.urandom(1 << 20)
    await store.create(record(data=big))
    got = await store.get("s1")
    assert got == record(data=big)
    with pytest.raises(SessionExists):
        await store.create(record())
    assert await store.get("missing") is None
    await store.close()


async def test_records_of_any_size_round_trip_grow_shrink_snapshot_and_go(make_store):
    """A Redis value holds at most 512 MB: Redis keeps a record's data in chunks (here of 4 KiB), and
    a record that grows, shrinks, is kept as a snapshot and is deleted leaves no chunk behind."""
    store = make_store()
    sizes = [CHUNK * 5 + 17, CHUNK * 2, CHUNK * 9, 10, CHUNK * 3]
    await store.create(record(data=os.urandom(sizes[0])))
    for version, size in enumerate(sizes[1:], start=1):
        data = os.urandom(size)
        assert await store.compare_and_set(record(version=version, data=data), version - 1, snapshot=(version, 3))
        assert (await store.get("s1")).data == data
    assert (await store.get_snapshot("s1", 2)).data != (await store.get_snapshot("s1", 3)).data
    assert len((await store.get_snapshot("s1", 2)).data) == sizes[2]
    assert await store.delete("s1") and await store.get("s1") is None and await store.get_snapshot("s1", 4) is None
    if isinstance(store, RedisStore):
        assert [k async for k in store._redis.scan_iter(match=f"{store._p}:*s1*")] == []
    await store.close()


async def test_only_a_store_no_other_process_writes_is_private(make_store):
    store = make_store()  # SessionService.binary_memory relies on it: a private store's step cannot lose a race
    assert store.private is isinstance(store, MemoryStore)
    await store.close()


async def test_compare_and_set_only_from_the_expected_version(make_store):
    store = make_store()
    await store.create(record())
    assert await store.version("s1") == 0 and await store.version("ghost") is None
    assert await store.compare_and_set(record(version=1, data=b"one"), 0)
    assert await store.version("s1") == 1
    assert not await store.compare_and_set(record(version=2, data=b"stale"), 0)
    assert await store.get("s1") == record(version=1, data=b"one")
    assert not await store.compare_and_set(record("ghost", version=1), 0)
    assert await store.get("ghost") is None
    await store.close()


async def test_exactly_one_of_many_concurrent_writers_wins(make_store):
    store = make_store()
    await store.create(record())
    results = await asyncio.gather(*(store.compare_and_set(record(version=1, data=bytes([i])), 0)
                                     for i in range(20)))
    assert sum(results) == 1
    winner = results.index(True)
    assert (await store.get("s1")).data == bytes([winner])
    await store.close()


async def test_claims_are_written_with_the_record_and_refuse_reuse(make_store):
    store = make_store()
    await store.create(record())
    claim = Claim("key-1", "a" * 64, 1, 1, 60)
    assert await store.get_claim("s1", "key-1") is None
    assert await store.compare_and_set(record(version=1), 0, claim)
    got = await store.get_claim("s1", "key-1")
    assert (got.key, got.body_digest, got.version, got.step) == ("key-1", "a" * 64, 1, 1) and 0 < got.ttl_seconds <= 60
    # the same key cannot be claimed again, even from the current version: nothing is written
    assert not await store.compare_and_set(record(version=2), 1, Claim("key-1", "b" * 64, 2, 2, 60))
    assert (await store.get("s1")).version == 1
    assert await store.compare_and_set(record(version=2), 1, Claim("key-2", "b" * 64, 2, 2, 60))
    await store.close()


async def test_claims_expire(make_store):
    store = make_store()
    await store.create(record())
    assert await store.compare_and_set(record(version=1), 0, Claim("k", "c" * 64, 1, 1, 1))
    await asyncio.sleep(1.2)
    assert await store.get_claim("s1", "k") is None
    assert await store.compare_and_set(record(version=2), 1, Claim("k", "d" * 64, 2, 2, 60))
    await store.close()


async def test_delete_removes_record_and_claims(make_store):
    store = make_store()
    await store.create(record())
    await store.compare_and_set(record(version=1), 0, Claim("k", "e" * 64, 1, 1, 60))
    assert await store.delete("s1")
    assert await store.get("s1") is None
    assert await store.get_claim("s1", "k") is None
    assert not await store.delete("s1")
    assert not await store.compare_and_set(record(version=2), 1)
    assert await store.list("alice", 10, None) == []
    await store.close()


async def test_list_pages_by_owner_and_count(make_store):
    store = make_store()
    ids = [f"id{i:02d}" for i in range(7)]
    for sid in ids:
        await store.create(record(sid, "alice"))
    await store.create(record("zz", "bob"))
    await store.create(record("nobody", None))
    first = await store.list("alice", 3, None)
    assert [r.id for r in first] == ids[:3]
    assert all(r.owner == "alice" and r.meta == b'{"m": 0}' for r in first)
    rest = await store.list("alice", 10, first[-1].id)
    assert [r.id for r in rest] == ids[3:]
    assert [r.id for r in await store.list("bob", 10, None)] == ["zz"]
    assert [r.id for r in await store.list(None, 10, None)] == ["nobody"]
    assert await store.count() == 9
    await store.close()


async def test_idle_sessions_expire_everywhere(make_store):
    store = make_store(ttl=1)
    await store.create(record("old"))
    await store.create(record("busy"))
    await asyncio.sleep(0.6)
    assert await store.compare_and_set(record("busy", version=1), 0)  # a write keeps it alive
    await asyncio.sleep(0.6)
    assert await store.sweep() == 1  # "old" is reclaimed, "busy" stays
    assert await store.get("old") is None
    assert await store.get("busy") is not None
    assert [r.id for r in await store.list("alice", 10, None)] == ["busy"]
    assert await store.count() == 1
    assert not await store.compare_and_set(record("old", version=1), 0)
    await store.create(record("old"))  # an expired id is free again
    await store.close()


async def test_every_redis_key_has_a_ttl(redis_url):
    prefix = f"ttl-{uuid.uuid4().hex}"
    store = RedisStore(redis_url, 3600, prefix=prefix, chunk_bytes=CHUNK)
    await store.create(record())
    await store.compare_and_set(record(version=1, data=bytes(3 * CHUNK + 5)), 0, Claim("k", "f" * 64, 1, 1, 600),
                                snapshot=(1, 2))
    await store.put_round("s1", round_record(1), 0, Claim("k2", "f" * 64, 1, 1, 600))
    await store.list("alice", 10, None)
    client = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    assert len(keys) >= 6 and any(k.endswith(b":round-data") for k in keys)
    assert any(k.endswith(b":data:3") for k in keys) and any(k.endswith(b":snap:1:3") for k in keys)
    for key in keys:
        assert await client.ttl(key) > 0, key
    await client.aclose()
    await store.close()


async def test_a_replica_never_reads_a_stale_copy(make_store):
    """Two stores over one backend, as two replicas: whatever one writes, the other reads next."""
    a, b = make_store(), make_store()
    if isinstance(a, MemoryStore):
        pytest.skip("a memory store lives in one process: nothing is shared to go stale")
    await a.create(record())
    assert (await a.get("s1")).version == 0 and (await b.get("s1")).version == 0
    assert await b.compare_and_set(record(version=1, data=b"from b"), 0)
    assert await a.get("s1") == record(version=1, data=b"from b")
    assert not await a.compare_and_set(record(version=1, data=b"stale"), 0)
    assert await b.delete("s1")
    assert await a.get("s1") is None
    await a.close()
    await b.close()


async def test_a_sqlite_file_from_0_1_0_keeps_its_claims(tmp_path):
    """0.1.0 named the claims' digest column body_sha256; opening such a file renames it in place."""
    path = f"{tmp_path}/old.db"
    store = open_store(f"sqlite:///{path}", 0)
    await store.create(record())
    assert await store.compare_and_set(record(version=1), 0, Claim("key-1", "d" * 64, 1, 1, 600))
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE claims RENAME COLUMN body_digest TO body_sha256")
    store = open_store(f"sqlite:///{path}", 0)
    got = await store.get_claim("s1", "key-1")
    assert (got.body_digest, got.version) == ("d" * 64, 1)
    assert await store.compare_and_set(record(version=2), 1, Claim("key-2", "e" * 64, 2, 2, 600))
    await store.close()


# --- caps, checked in the create's own transaction, and owner-scoped reads --------------------------

CAPS = Caps(sessions=50, sessions_per_owner=30, bytes_per_owner=1 << 40)


async def test_caps_hold_under_concurrent_creates_from_many_clients(make_store):
    """The issue's case: one key at its cap of 30, two more racing for the 20 places left of 50. Each
    store a test makes is another client of the same backend, as replicas are."""
    stores = [make_store() for _ in range(4)]
    if isinstance(stores[0], MemoryStore):  # one process's dict: its clients are its coroutines
        stores = [stores[0]] * 4
    for i in range(30):
        await stores[0].create(record(f"alice-{i:02d}", owner="alice"), CAPS)
    with pytest.raises(CapReached) as refused:
        await stores[1].create(record("alice-30", owner="alice"), CAPS)
    assert (refused.value.cap, refused.value.limit, refused.value.used) == ("sessions_per_owner", 30, 30)

    async def attempt(store, sid, owner):
        try:
            await store.create(record(sid, owner=owner), CAPS)
            return 1
        except CapReached as e:
            assert e.cap in ("sessions", "sessions_per_owner")
            return 0

    made = await asyncio.gather(*(attempt(stores[i % 4], f"{owner}-{i:02d}", owner)
                                  for i in range(30) for owner in ("bob", "carol")))
    assert sum(made) == 20
    assert await stores[0].count() == 50
    assert await stores[0].count_owned("bob") + await stores[0].count_owned("carol") == 20
    await stores[2].delete("alice-00")  # a delete gives its place back
    await stores[3].create(record("dave-0", owner="dave"), CAPS)
    for store in stores:
        await store.close()


async def test_a_key_byte_budget_counts_tensors_and_metadata(make_store):
    store = make_store()
    size = len(record(data=bytes(1000)).data) + len(record().meta)
    caps = Caps(sessions=100, sessions_per_owner=100, bytes_per_owner=3 * size)
    for i in range(3):
        await store.create(record(f"s{i}", data=bytes(1000)), caps)
    with pytest.raises(CapReached) as refused:
        await store.create(record("s3", data=bytes(1000)), caps)
    assert (refused.value.cap, refused.value.used, refused.value.needed) == ("bytes_per_owner", 3 * size, size)
    await store.create(record("other", owner="bob", data=bytes(1000)), caps)  # another key's budget
    await store.create(record("anonymous", owner=None, data=bytes(10_000)), caps)  # keys off: no per-key cap
    await store.delete("s0")
    await store.create(record("s3", data=bytes(1000)), caps)
    await store.close()


async def test_expired_sessions_count_against_no_cap(make_store):
    store = make_store(ttl=1)
    caps = Caps(sessions=2, sessions_per_owner=2, bytes_per_owner=1 << 30)
    await store.create(record("a"), caps)
    await store.create(record("b"), caps)
    with pytest.raises(CapReached):
        await store.create(record("c"), caps)
    await asyncio.sleep(2.1)
    await store.create(record("c"), caps)
    await store.close()


async def test_a_read_for_another_owner_finds_nothing(make_store):
    store = make_store()
    await store.create(record("s1", owner="alice", data=os.urandom(1 << 16)))
    assert (await store.get("s1", "alice")).data == (await store.get("s1")).data
    assert await store.get("s1", "mallory") is None
    assert await store.get("s1", None) is None
    assert await store.get("ghost", "alice") is None
    await store.create(record("s2", owner=None))
    assert (await store.get("s2", None)).owner is None and await store.get("s2", "alice") is None
    await store.close()


async def test_only_the_memory_store_keeps_a_total_byte_budget():
    store = MemoryStore()
    caps = Caps(sessions=100, sessions_per_owner=100, bytes_per_owner=1 << 40, total_bytes=2500)
    await store.create(record("a", data=bytes(1000)), caps)
    await store.create(record("b", owner="bob", data=bytes(1000)), caps)
    with pytest.raises(CapReached) as refused:
        await store.create(record("c", owner="carol", data=bytes(1000)), caps)
    assert refused.value.cap == "total_bytes" and refused.value.limit == 2500


# --- rounds: a session's open round of contributions ------------------------------------------------

def round_record(version: int, data: bytes = b"\x00" * 16) -> RoundRecord:
    return RoundRecord(version, b'{"round": 0, "received": %d}' % version, data)


async def test_a_round_is_written_from_its_expected_version_only(make_store):
    store = make_store()
    await store.create(record())
    assert await store.get_round("s1") is None
    assert not await store.put_round("s1", round_record(1), 1)  # none exists yet: expected 0
    assert await store.put_round("s1", round_record(1, b"one"), 0)
    assert not await store.put_round("s1", round_record(2, b"stale"), 0)
    assert await store.put_round("s1", round_record(2, b"two"), 1)
    assert await store.get_round("s1") == round_record(2, b"two")
    assert not await store.put_round("ghost", round_record(1), 0)  # no round without its session
    results = await asyncio.gather(*(store.put_round("s1", round_record(3, bytes([i])), 2) for i in range(10)))
    assert sum(results) == 1  # concurrent contributions: one wins, the others reload
    await store.close()


async def test_closing_a_round_commits_the_session_and_removes_the_round_together(make_store):
    store = make_store()
    await store.create(record())
    await store.put_round("s1", round_record(1), 0)
    assert not await store.compare_and_set(record(version=1), 0, close_round=2)  # the round moved: nothing
    assert await store.get("s1") == record() and await store.get_round("s1") == round_record(1)
    claim = Claim("k1", "digest", 1, 1, 3600)
    assert await store.compare_and_set(record(version=1, data=b"stepped"), 0, claim, close_round=1)
    assert await store.get_round("s1") is None and (await store.get("s1")).data == b"stepped"
    assert (await store.get_claim("s1", "k1")).version == 1
    assert not await store.compare_and_set(record(version=2), 1, close_round=1)  # no round is open now
    assert await store.compare_and_set(record(version=2), 1, close_round=0)  # "none open" holds
    await store.close()


async def test_a_claim_taken_refuses_a_round_write_and_writes_nothing(make_store):
    store = make_store()
    await store.create(record())
    assert await store.put_round("s1", round_record(1), 0, Claim("k", "d", 0, 0, 3600))
    assert not await store.put_round("s1", round_record(2, b"again"), 1, Claim("k", "d", 0, 0, 3600))
    assert await store.get_round("s1") == round_record(1)
    assert not await store.compare_and_set(record(version=1), 0, Claim("k", "d", 1, 1, 3600), close_round=1)
    assert await store.get_round("s1") == round_record(1) and (await store.get("s1")).version == 0
    await store.delete("s1")
    assert await store.get_round("s1") is None
    await store.close()


# --- history: appended by the step's own compare-and-set --------------------------------------------

async def test_history_is_appended_with_the_step_and_bounded_with_older_entries_downsampled(make_store):
    store = make_store()
    await store.create(record())
    for v in range(1, 51):
        assert await store.compare_and_set(record(version=v), v - 1, history=(b"%d" % v, 10))
    assert not await store.compare_and_set(record(version=99), 0, history=(b"lost", 10))  # a lost race adds nothing
    kept = [int(e) for e in await store.get_history("s1")]
    assert kept[-10:] == list(range(41, 51))  # the last 10, whole
    assert kept[:-10] == [10, 20, 30, 40]  # of the 40 dropped, every 10th
    assert kept == sorted(kept)
    await store.delete("s1")
    assert await store.get_history("s1") == []
    await store.close()


async def test_the_private_store_keeps_a_pending_line_and_reads_it_as_bytes():
    """A private store may be given a line measured when first read (history.Pending; the service
    gives the others bytes): it keeps it as given, measures it no sooner than a read or the next
    line asks, and gives bytes either way."""
    from optim_service.history import Pending

    store = open_store("memory")
    assert store.private
    await store.create(record())
    measured = []

    def line(v: int) -> Pending:
        return Pending(lambda: measured.append(v) or b"%d" % v)

    for v in range(1, 4):
        assert await store.compare_and_set(record(version=v), v - 1, history=(line(v), 10))
    assert measured == [1, 2]  # each line measured as the next came, the last not yet
    assert await store.get_history("s1") == [b"1", b"2", b"3"] and measured == [1, 2, 3]
    assert await store.get_history("s1") == [b"1", b"2", b"3"] and measured == [1, 2, 3]  # once each
    await store.close()


# --- snapshots: kept by the step's own compare-and-set ---------------------------------------------

async def test_snapshots_are_kept_by_step_and_a_rollback_drops_the_later_ones(make_store):
    store = make_store()
    await store.create(record())
    for v in range(1, 8):
        assert await store.compare_and_set(record(version=v, data=b"state-%d" % v), v - 1, snapshot=(v, 3))
    assert await store.snapshot_steps("s1") == [5, 6, 7]
    assert (await store.get_snapshot("s1", 6)).data == b"state-6" and await store.get_snapshot("s1", 4) is None
    # back to step 5: the restored state is step 5's snapshot again, 6 and 7 are gone
    assert await store.compare_and_set(record(version=8, data=b"state-5"), 7, snapshot=(5, 3))
    assert await store.snapshot_steps("s1") == [5]
    assert not await store.compare_and_set(record(version=99), 0, snapshot=(9, 3))  # a lost race keeps nothing
    assert await store.snapshot_steps("s1") == [5]
    await store.delete("s1")
    assert await store.snapshot_steps("s1") == [] and await store.get_snapshot("s1", 5) is None
    await store.close()
