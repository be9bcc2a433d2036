"""Rounds across processes: 8 workers × 20 rounds against two Redis replicas, and against SQLite
served by two worker processes, every contribution sent twice under one Idempotency-Key (to another
replica where there is one), and a replica or worker killed with -9 in the middle of a round. Every
round must apply exactly the mean of its 8 contributions: none lost, none counted twice. Gradients
are whole numbers, so the expected weights are exact whatever order a round summed them in."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest

from conftest import ServerProcess, free_port, wait_for_port

WORKERS, ROUNDS, KILL_AT = 8, 20, 10


def gradient(worker: int, round_: int) -> list[float]:
    return [float(worker + 1 + 100 * round_), float(-worker), 1.0]


def expected_params() -> np.ndarray:
    params = np.zeros(3)
    for r in range(ROUNDS):
        params -= sum(np.array(gradient(w, r)) for w in range(WORKERS)) / WORKERS  # SGD, lr 1
    return params


def send(url: str, sid: str, worker: int, round_: int) -> int | None:
    """One contribution (a retry of it has the same key); its status, or None if the process died."""
    try:
        answer = httpx.post(f"{url}/v1/sessions/{sid}/step", timeout=30,
                            headers={"Idempotency-Key": f"w{worker}-r{round_}"},
                            json={"gradients": gradient(worker, round_), "worker": f"w{worker}", "round": round_})
    except httpx.TransportError:
        return None
    assert answer.status_code in (200, 202), answer.text
    return answer.status_code


def run_rounds(urls: list[str], sid: str, kill) -> None:
    """Each round: every worker's contribution goes to one replica and its retry to the next one.
    In round KILL_AT half the workers contribute, one replica is killed, and the others follow."""
    alive = list(urls)
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for r in range(ROUNDS):
            def contribute(w: int) -> None:
                targets = [alive[(w + r) % len(alive)], alive[(w + r + 1) % len(alive)]]
                statuses = [send(url, sid, w, r) for url in targets]
                assert any(s is not None for s in statuses), f"worker {w} reached no replica in round {r}"

            if r == KILL_AT:
                first = [w for w in range(WORKERS) if w % 2 == 0]
                acknowledged = [send(alive[0], sid, w, r) for w in first]  # each answered 202 before the kill
                assert acknowledged == [202] * len(first)
                kill()
                alive = alive[1:] or alive
                list(pool.map(contribute, range(WORKERS)))  # the rest, and retries of the first half
            else:
                list(pool.map(contribute, range(WORKERS)))
            deadline = time.monotonic() + 30
            while True:  # the round committed once its last contribution came
                params = httpx.get(f"{alive[-1]}/v1/sessions/{sid}/params", timeout=10).json()
                if params["step"] == r + 1:
                    break
                assert params["step"] == r and time.monotonic() < deadline, params
                time.sleep(0.05)
    final = httpx.get(f"{alive[-1]}/v1/sessions/{sid}/params", timeout=10).json()
    assert final["step"] == ROUNDS
    np.testing.assert_array_equal(final["params"], expected_params())


def create(url: str) -> str:
    answer = httpx.post(f"{url}/v1/sessions", json={
        "optimizer": {"type": "sgd", "lr": 1.0}, "dtype": "float64", "params": [0.0, 0.0, 0.0],
        "aggregation": {"mode": "sync", "contributions": WORKERS}})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def test_two_redis_replicas_lose_and_double_no_contribution(tmp_path):
    port = free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                  stdout=subprocess.DEVNULL)
    wait_for_port(port)
    store = f"redis://127.0.0.1:{port}/0"
    replicas = [ServerProcess("--store", store) for _ in range(2)]
    try:
        sid = create(replicas[0].url)
        run_rounds([r.url for r in replicas], sid, kill=lambda: replicas[0].proc.send_signal(signal.SIGKILL))
    finally:
        for replica in replicas:
            replica.stop()
        redis_proc.terminate()
        redis_proc.wait(10)


def test_sqlite_with_two_workers_loses_and_doubles_no_contribution(tmp_path):
    server = ServerProcess("--store", f"sqlite:///{tmp_path}/rounds.db", "--workers", "2")
    children = _children(server.proc.pid)
    assert len(children) == 2, children

    def kill_a_worker() -> None:
        os.kill(children[0], signal.SIGKILL)  # the supervisor starts another; requests in flight retry

    try:
        sid = create(server.url)
        run_rounds([server.url, server.url], sid, kill=kill_a_worker)
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        workers = []
        for child in map(int, found):  # uvicorn's workers, not multiprocessing's resource tracker
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"resource_tracker" not in f.read():
                    workers.append(child)
        if len(workers) >= 2:
            return workers
        time.sleep(0.2)
    pytest.fail("the server did not start two workers")
