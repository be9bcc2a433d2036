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
