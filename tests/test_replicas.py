"""Real server processes sharing state: two replicas on one Redis, two workers on one SQLite file,
kill -9 at the worst moment, and idempotent retries that cross replicas and restarts."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from conftest import ServerProcess

CLIENTS, STEPS, SIZE = 8, 25, 16


@pytest.fixture
def clean_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


def one_hot(i: int) -> list[float]:
    grad = [0.0] * SIZE
    grad[i % SIZE] = 1.0
    return grad


def hammer(urls: list[str], session_id: str, clients: int = CLIENTS, steps: int = STEPS):
    """Each client alternates between the servers; returns the (step, hot index) of every answer."""
    def client(c: int):
        seen = []
        https = [httpx.Client(base_url=u, timeout=30) for u in urls]
        for k in range(steps):
            hot = c * steps + k
            r = https[(c + k) % len(urls)].post(f"/v1/sessions/{session_id}/step",
                                                json={"gradients": one_hot(hot)})
            assert r.status_code == 200, r.text
            seen.append((r.json()["step"], hot % SIZE))
        for h in https:
            h.close()
        return seen

    with ThreadPoolExecutor(clients) as pool:
        return [s for batch in pool.map(client, range(clients)) for s in batch]


def assert_exact(url: str, session_id: str, answers: list[tuple[int, int]]):
    assert sorted(s for s, _ in answers) == list(range(1, len(answers) + 1))
    expected = np.zeros(SIZE)
    for _, hot in answers:
        expected[hot] -= 1.0
    r = httpx.get(f"{url}/v1/sessions/{session_id}/params")
    assert r.json()["step"] == len(answers)
    np.testing.assert_array_equal(r.json()["params"], expected)


def after_one_hot_steps(n: int) -> np.ndarray:
    """SGD lr=1 from zeros after one_hot(0), ..., one_hot(n-1)."""
    expected = np.zeros(SIZE)
    for k in range(n):
        expected[k % SIZE] -= 1.0
    return expected


def create(url: str) -> str:
    r = httpx.post(f"{url}/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 1.0},
                                               "params": [0.0] * SIZE, "dtype": "float64"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_two_servers_on_one_redis_behave_as_one(clean_redis):
    a = ServerProcess("--store", clean_redis)
    b = ServerProcess("--store", clean_redis)
    try:
        sid = create(a.url)
        answers = hammer([a.url, b.url], sid)
        assert len(answers) == 200
        assert_exact(b.url, sid, answers)
    finally:
        a.stop()
        b.stop()


def test_two_workers_on_one_sqlite_file(tmp_path):
    server = ServerProcess("--store", f"sqlite:///{tmp_path}/optim.db", "--workers", "2")
    try:
        sid = create(server.url)
        answers = hammer([server.url], sid)
        assert_exact(server.url, sid, answers)
    finally:
        server.stop()


def test_kill_9_right_after_acknowledgements_loses_nothing_on_sqlite(tmp_path):
    store = f"sqlite:///{tmp_path}/optim.db"
    server = ServerProcess("--store", store)
    sid = create(server.url)
    acknowledged = 0
    for k in range(30):
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"gradients": one_hot(k)})
        assert r.status_code == 200
        acknowledged = r.json()["step"]
    server.proc.kill()  # SIGKILL: no shutdown, no flush
    server.proc.wait()
    restarted = ServerProcess("--store", store)
    try:
        r = httpx.get(f"{restarted.url}/v1/sessions/{sid}/params")
        assert r.json()["step"] == acknowledged == 30
        expected = after_one_hot_steps(30)
        np.testing.assert_array_equal(r.json()["params"], expected)
    finally:
        restarted.stop()


def test_replica_killed_under_load_loses_nothing_acknowledged(clean_redis):
    """Clients retry by Idempotency-Key on the surviving replica; every acknowledged step counts once."""
    a = ServerProcess("--store", clean_redis)
    b = ServerProcess("--store", clean_redis)
    try:
        sid = create(a.url)
        answers: list[tuple[int, int]] = []
        lock = threading.Lock()

        def client(c: int):
            urls = [a.url, b.url]
            for k in range(STEPS):
                hot = (c * STEPS + k) % SIZE
                key = uuid.uuid4().hex
                for attempt in range(20):
                    url = urls[(c + k + attempt) % 2]
                    try:
                        r = httpx.post(f"{url}/v1/sessions/{sid}/step", timeout=10,
                                       json={"gradients": one_hot(hot)}, headers={"Idempotency-Key": key})
                    except httpx.TransportError:
                        continue  # that replica is dead: retry the same key on the other
                    if r.status_code == 200 or (r.status_code == 409 and "step" in r.json()):
                        # 409 with a step: applied by the dead replica, its answer since gone
                        with lock:
                            answers.append((r.json()["step"], hot))
                        break
                    assert r.status_code in (409, 503), r.text
                else:
                    raise AssertionError("step never acknowledged")

        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, c) for c in range(CLIENTS)]
            while len(answers) < 40:
                threading.Event().wait(0.01)
            a.proc.kill()
            for f in futures:
                f.result()
        replayed_or_not = {}
        for step, hot in answers:
            replayed_or_not.setdefault(step, hot)
        unique = sorted(replayed_or_not.items())
        assert [s for s, _ in unique] == list(range(1, CLIENTS * STEPS + 1))
        assert_exact(b.url, sid, unique)
    finally:
        a.stop()
        b.stop()


def test_idempotent_retry_on_another_replica_and_after_restart(clean_redis):
    a = ServerProcess("--store", clean_redis)
    b = ServerProcess("--store", clean_redis)
    sid = create(a.url)
    headers = {"Idempotency-Key": "retry-me"}
    body = {"gradients": one_hot(3)}
    first = httpx.post(f"{a.url}/v1/sessions/{sid}/step", json=body, headers=headers)
    second = httpx.post(f"{b.url}/v1/sessions/{sid}/step", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and second.headers["idempotent-replayed"] == "true"
    a.stop()
    b.stop()
    c = ServerProcess("--store", clean_redis)
    try:
        third = httpx.post(f"{c.url}/v1/sessions/{sid}/step", json=body, headers=headers)
        assert third.content == first.content
        assert httpx.get(f"{c.url}/v1/sessions/{sid}").json()["step"] == 1
    finally:
        c.stop()


def test_idempotent_retry_after_restart_on_sqlite(tmp_path):
    store = f"sqlite:///{tmp_path}/optim.db"
    server = ServerProcess("--store", store)
    sid = create(server.url)
    headers = {"Idempotency-Key": "k-1", "Content-Type": "application/octet-stream"}
    payload = np.arange(SIZE, dtype="<f8").tobytes()
    first = httpx.post(f"{server.url}/v1/sessions/{sid}/step", content=payload, headers=headers)
    server.proc.kill()
    server.proc.wait()
    restarted = ServerProcess("--store", store)
    try:
        again = httpx.post(f"{restarted.url}/v1/sessions/{sid}/step", content=payload, headers=headers)
        assert again.status_code == 200 and again.content == first.content
        assert httpx.get(f"{restarted.url}/v1/sessions/{sid}").json()["step"] == 1
    finally:
        restarted.stop()


def test_redis_killed_with_aof_on_keeps_every_acknowledged_step(tmp_path):
    """kill -9 of redis-server itself (appendonly yes, appendfsync everysec): while it is down the
    service answers 503 and changes nothing; after the restart every acknowledged step is there."""
    from conftest import free_port, wait_for_port

    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
           "--appendfsync", "everysec", "--dir", str(tmp_path)]
    redis_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_for_port(port)
    server = ServerProcess("--store", f"redis://127.0.0.1:{port}/0")
    try:
        sid = create(server.url)
        for k in range(30):
            assert httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"gradients": one_hot(k)}).status_code == 200
        redis_proc.kill()
        redis_proc.wait()
        down = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"gradients": one_hot(0)})
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert "nothing was changed" in down.json()["detail"]
        # the client's answer names no backend; the operator's log names the cause
        assert f"store unavailable (ConnectionError: Error 111 connecting to 127.0.0.1:{port}" in server.logs()
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        redis_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        wait_for_port(port)
        for _ in range(300):  # the client reconnects on its own (Redis first replays its AOF)
            if httpx.get(f"{server.url}/readyz").status_code == 200:
                break
            time.sleep(0.1)
        r = httpx.get(f"{server.url}/v1/sessions/{sid}/params")
        assert r.status_code == 200 and r.json()["step"] == 30
        expected = after_one_hot_steps(30)
        np.testing.assert_array_equal(r.json()["params"], expected)
    finally:
        server.stop()
        redis_proc.kill()
