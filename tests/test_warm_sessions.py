"""The decoded-session cache a step forks from: private copies, version checks, a byte bound."""

from __future__ import annotations

import numpy as np
import pytest

from optim_service.optim.config import TrainingConfig
from optim_service.record import Layout, Session, from_record
from optim_service.sessions import WarmSessions


def _record(session_id: str, size: int, version: int = 0, value: float = 0.0):
    config = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    param = np.full(size, value, np.float32)
    session = Session(session_id, None, config, Layout(("w",), ((size,),), "float32", "object"), 0,
                      [param], [config.algorithm.init(param, config.optimizer)], version=version)
    return session.to_record()


def test_a_fork_is_private_and_leaves_the_stored_record_untouched():
    record = _record("a", 8, value=1.0)
    stored = bytes(record.data)
    warm = WarmSessions(1 << 20)
    fork = warm.template(record).fork()
    fork.params[0][:] = 7.0
    fork.states[0].exp_avg[:] = 3.0
    assert bytes(record.data) == stored
    again = warm.template(record).fork()
    np.testing.assert_array_equal(again.params[0], np.ones(8, np.float32))
    np.testing.assert_array_equal(again.states[0].exp_avg, np.zeros(8, np.float32))
    assert again.params[0].flags.writeable and again.config_json == fork.config_json


def test_the_template_is_read_only():
    warm = WarmSessions(1 << 20)
    warm.template(_record("a", 4)).fork()
    template = warm._sessions.get("a")
    with pytest.raises(ValueError):
        template.params[0][0] = 1.0


def test_a_record_at_another_version_is_decoded_afresh():
    warm = WarmSessions(1 << 20)
    warm.template(_record("a", 4, version=1, value=1.0)).fork()
    newer = warm.template(_record("a", 4, version=2, value=5.0)).fork()  # written by another process
    assert newer.version == 2
    np.testing.assert_array_equal(newer.params[0], np.full(4, 5.0, np.float32))


def test_a_remembered_step_is_what_the_next_fork_starts_from():
    warm = WarmSessions(1 << 20)
    session = warm.template(_record("a", 4, version=3)).fork()
    session.params[0][:] = 2.5
    session.version = 4
    warm.remember(session)
    nxt = warm.template(session.to_record()).fork()
    np.testing.assert_array_equal(nxt.params[0], np.full(4, 2.5, np.float32))
    assert nxt.buffer is not session.buffer


def test_least_recently_used_sessions_leave_beyond_the_byte_bound():
    one = len(_record("x", 100).data)
    warm = WarmSessions(2 * one)
    for sid in "abc":
        warm.template(_record(sid, 100)).fork()
    assert list(warm._sessions) == ["b", "c"]
    warm.template(_record("b", 100))  # touched: now the most recent
    warm.template(_record("d", 100)).fork()
    assert list(warm._sessions) == ["b", "d"]
    assert warm._sessions.bytes == 2 * one


def test_a_session_larger_than_the_bound_is_not_kept():
    warm = WarmSessions(100)
    fork = warm.template(_record("big", 1000)).fork()
    assert fork.params[0].size == 1000 and not warm._sessions


def test_from_record_rejects_data_of_the_wrong_length():
    record = _record("a", 4)
    short = type(record)(record.id, record.owner, record.version, record.meta, record.data[:-4])
    with pytest.raises(ValueError, match="data bytes"):
        from_record(short)


async def test_a_session_gone_from_the_store_leaves_the_warm_cache():
    from optim_service.errors import SessionNotFound
    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import MemoryStore

    store = MemoryStore()
    service = SessionService(store, Settings(store="memory"))
    config = TrainingConfig.model_validate({"optimizer": {"type": "sgd"}})
    session = await service.create(None, config, Layout(("",), ((4,),), "float32", "array"),
                                   [np.zeros(4, np.float32)])
    assert session.id in service._warm._sessions
    await store.delete(session.id)  # as expiry or another client would
    with pytest.raises(SessionNotFound):
        await service.load(None, session.id)
    assert session.id not in service._warm._sessions and service._warm._sessions.bytes == 0


async def test_with_a_private_store_a_session_stays_warm_past_the_cache_bound_until_the_store_drops_it():
    """With the memory store a warm session is the stored record itself: it stays warm however
    large (so a binary step reads its body into a reused working copy, not fresh memory: three
    clients of 10M-parameter sessions overflowed the 256 MB bound and every step faulted in a fresh
    120 MB), and the sweep lets go of it once the store has (here: expired)."""
    import asyncio

    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import MemoryStore

    store = MemoryStore(session_ttl_seconds=1)
    service = SessionService(store, Settings(store="memory", cache_bytes=1024))
    config = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    sessions = [await service.create(None, config, Layout(("",), ((4096,),), "float32", "array"),
                                     [np.zeros(4096, np.float32)]) for _ in range(3)]
    for s in sessions:  # 16 KB of parameters each, beyond a 1 KB bound
        assert service.binary_memory(None, s.id, 4 * 4096) is not None
    await service.prune_warm()
    assert set(service._warm.ids()) == {s.id for s in sessions}  # all still in the store
    await asyncio.sleep(1.1)
    await store.sweep()
    await service.prune_warm()
    assert service._warm.ids() == []


async def test_with_a_shared_store_the_cache_keeps_its_byte_bound(tmp_path):
    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import open_store

    store = open_store(f"sqlite:///{tmp_path}/w.db")
    service = SessionService(store, Settings(store=f"sqlite:///{tmp_path}/w.db", cache_bytes=1024))
    config = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    session = await service.create(None, config, Layout(("",), ((4096,),), "float32", "array"),
                                   [np.zeros(4096, np.float32)])
    assert session.id not in service._warm.ids()  # its state would be a second copy: over the bound
    await store.close()


async def test_a_served_step_settles_once_its_answer_is_sent():
    """The lane sends a step's answer, then settles the step (``StepResult.settle``): the committed
    session is the warm one, frozen, and the next step forks it rather than decoding the record."""
    import httpx

    from optim_service.app import create_app
    from optim_service.settings import Settings

    application = create_app(Settings(store="memory"))
    async with application.router.lifespan_context(application):
        service = application.state.sessions
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as c:
            sid = (await c.post("/v1/sessions", json={"params": [0.0, 1.0], "optimizer": {"type": "adam"}})).json()["id"]
            for step in (1, 2):
                answer = (await c.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, -0.5]})).json()
                warm = service._warm.get(sid)
                record = await service.store.get(sid, None)
                assert warm.step == step == answer["step"] and warm.version == record.version
                assert not warm.params[0].flags.writeable and not warm.buffer.flags.writeable
                np.testing.assert_array_equal(warm.params[0], np.array(answer["params"], np.float32))


async def test_a_step_settled_after_a_later_one_leaves_the_later_one_warm():
    """A step's settle waits for its answer's send, which a slow reader can hold while the next
    step of the session commits and settles: the earlier settle then keeps the later session warm,
    and the steps go on from it."""
    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import MemoryStore

    def decode(_):
        return [np.full(4, 0.5, np.float32)]

    async def run(deferred: bool):
        service = SessionService(MemoryStore(), Settings(store="memory"))
        config = TrainingConfig.model_validate({"optimizer": {"type": "adam", "lr": 0.1}})
        session = await service.create(None, config, Layout(("",), ((4,),), "float32", "array"),
                                       [np.zeros(4, np.float32)])
        first = await service.step(None, session.id, decode, settle_later=deferred)
        second = await service.step(None, session.id, decode, settle_later=deferred)
        if deferred:
            assert first.settle is not None and second.settle is not None
            second.settle()
            first.settle()  # late: the second stays the warm one
            assert service._warm.get(session.id) is second.session
            assert not first.session.params[0].flags.writeable
        third = await service.step(None, session.id, decode)
        return third.session.params[0].copy(), third.session.step

    deferred, plain = await run(True), await run(False)
    assert deferred[1] == plain[1] == 3
    np.testing.assert_array_equal(deferred[0], plain[0])


async def test_a_served_steps_history_line_is_measured_once_its_answer_is_sent():
    """With the memory store a step's history line is committed unmeasured (history.Pending) and
    measured by the step's settle, after its answer: read before that, it is measured then. Either
    way it is the line an unsettled step would have written there and then."""
    from optim_service import history
    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import MemoryStore

    def decode(_):
        return [np.array([0.5, -1.0, 2.0], np.float32)]

    async def run(deferred: bool, read_before_settle: bool = False):
        service = SessionService(MemoryStore(), Settings(store="memory"))
        config = TrainingConfig.model_validate({"optimizer": {"type": "adam", "lr": 0.1}})
        session = await service.create(None, config, Layout(("",), ((3,),), "float32", "array"),
                                       [np.array([1.0, 2.0, 3.0], np.float32)])
        lines = []
        for loss in (3.0, 2.0):
            result = await service.step(None, session.id, decode, loss=loss, settle_later=deferred)
            if deferred:
                pending = service.store._history[session.id][0][-1]
                assert isinstance(pending, history.Pending) and pending._line is None  # not measured yet
                if read_before_settle:
                    lines = await service.store.get_history(session.id)
                result.settle()
                assert pending._line is not None and pending._measure is None  # measured, its arrays let go
        lines = await service.store.get_history(session.id)
        assert all(type(line) is bytes for line in lines)
        return [{k: v for k, v in history.decode(line, ("",)).items() if k != "time"} for line in lines]

    plain = await run(False)
    assert [line["step"] for line in plain] == [1, 2] and plain[0]["grad_norm"] > 0
    assert await run(True) == plain
    assert await run(True, read_before_settle=True) == plain
