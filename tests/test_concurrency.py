"""Concurrent steps on one session serialise: no lost and no doubled update."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from optim_client import OptimClient

THREADS, STEPS, SIZE = 16, 25, 32


def test_many_threads_on_one_session_give_exact_count_and_params(server):
    p0 = np.zeros(SIZE)
    with OptimClient(server.url) as client:
        session = client.create_session(p0, optimizer="sgd", lr=1.0)

    def worker(i: int) -> list[tuple[int, int]]:
        seen = []
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for k in range(STEPS):
                hot = (i * STEPS + k) % SIZE
                grad = np.zeros(SIZE)
                grad[hot] = 1.0
                r = http.post(f"/v1/sessions/{session.id}/step", json={"gradients": grad.tolist()})
                assert r.status_code == 200, r.text
                seen.append((r.json()["step"], hot))
        return seen

    with ThreadPoolExecutor(THREADS) as pool:
        results = [s for batch in pool.map(worker, range(THREADS)) for s in batch]
    steps = sorted(step for step, _ in results)
    assert steps == list(range(1, THREADS * STEPS + 1))  # every step number exactly once
    expected = p0.copy()
    for _, hot in results:
        expected[hot] -= 1.0
    with OptimClient(server.url) as client:
        final = client.get_session(session.id)
    assert final.step_count == THREADS * STEPS
    np.testing.assert_array_equal(final.params, expected)


def test_sdk_retry_after_a_lost_answer_applies_the_step_once(server):
    """The first answer is dropped after the server applied it; the retry (same key) is replayed."""
    keys = []

    class DropFirstStepAnswer(httpx.HTTPTransport):
        def handle_request(self, request):
            response = super().handle_request(request)
            if request.url.path.endswith("/step"):
                keys.append(request.headers["idempotency-key"])
                if len(keys) == 1:
                    response.read()
                    raise httpx.ReadError("connection reset", request=request)
            return response

    with OptimClient(server.url, transport=DropFirstStepAnswer()) as client:
        session = client.create_session({"x": np.zeros(100)}, optimizer="sgd", lr=1.0)
        out = session.step({"x": np.ones(100)})
        assert len(keys) == 2 and keys[0] == keys[1]
        assert session.step_count == 1
        np.testing.assert_array_equal(out["x"], -np.ones(100))
        assert client.get_session(session.id).step_count == 1


async def test_steps_queued_on_one_session_take_turns_and_leave_no_lock_behind():
    """In one process: each update hops to a thread (so the steps really wait for each other), one
    waiting step is cancelled, and once all are done no per-session lock is left."""
    import asyncio

    from optim_service.optim.config import TrainingConfig
    from optim_service.record import Layout
    from optim_service.sessions import SessionService
    from optim_service.settings import Settings
    from optim_service.store import MemoryStore

    service = SessionService(MemoryStore(), Settings(store="memory", thread_offload_elements=0))
    config = TrainingConfig.model_validate({"optimizer": {"type": "sgd", "lr": 0.5}})
    session = await service.create(None, config, Layout(("",), ((4,),), "float32", "array"),
                                   [np.zeros(4, np.float32)])

    def ones(_session):
        return [np.ones(4, np.float32)]

    tasks = [asyncio.create_task(service.step(None, session.id, ones)) for _ in range(20)]
    await asyncio.sleep(0)  # every step has started; the first holds the lock across its thread hop
    tasks[5].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[5], asyncio.CancelledError)
    applied = sorted(r.session.step for r in results if not isinstance(r, BaseException))
    assert applied == list(range(1, 20))  # every step number once: none lost, none doubled
    final = await service.load(None, session.id)
    np.testing.assert_array_equal(final.params[0], np.full(4, -0.5 * 19, np.float32))
    assert service._turns.held() == []


async def test_turns_pass_in_order_time_out_and_are_passed_on_by_a_caller_giving_up():
    """A session's turn goes to its waiters first come first served; a waiter past the timeout gets
    SessionBusy (503); one cancelled just as the turn reached it passes the turn on rather than
    keeping it; and no session is left held."""
    import asyncio

    import pytest

    from optim_service.errors import SessionBusy
    from optim_service.sessions import Turns

    turns, order = Turns(timeout=0.2), []

    async def step(name: str, hold: float):
        turn = turns.take("s")
        if turn is not None:
            await turns.wait("s", turn)
        try:
            order.append(name)
            await asyncio.sleep(hold)
        finally:
            turns.leave("s")

    await asyncio.gather(step("a", 0.01), step("b", 0.01), step("c", 0.01))
    assert order == ["a", "b", "c"] and turns.held() == []

    first = asyncio.create_task(step("slow", 0.5))
    await asyncio.sleep(0)
    with pytest.raises(SessionBusy):
        await step("late", 0)
    await first
    assert turns.held() == []

    assert turns.take("s") is None  # held; then one waits and is cancelled as the turn reaches it
    waiter = asyncio.create_task(turns.wait("s", turns.take("s")))
    behind = turns.take("s")
    await asyncio.sleep(0)
    turns.leave("s")  # the turn passes to the waiter...
    waiter.cancel()  # ...which gives up before it runs: it must pass the turn on
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(turns.wait("s", behind), 1)
    turns.leave("s")
    assert turns.held() == []
