"""Past one machine: the service on a real Redis Cluster (3 masters, a replica each, on loopback).

The store contract runs on a cluster in tests/test_store_contract.py (``cluster`` and
``cluster+wait``); here two servers share one cluster, and a master dies under a session whose
steps were acknowledged only once its replica had them (``OPTIM_REDIS_WAIT_REPLICAS=1``): its replica
is promoted and every acknowledged step is there; a read during the failover waits it out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from conftest import RedisCluster, ServerProcess
from test_replicas import after_one_hot_steps, create, one_hot


def step(url: str, sid: str, k: int, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/step", json={"gradients": one_hot(k)}, timeout=30, **kw)


def test_two_servers_on_one_cluster_spread_sessions_and_behave_as_one(redis_cluster):
    a, b = (ServerProcess("--store", redis_cluster.url) for _ in range(2))
    try:
        ids = [create(a.url) for _ in range(12)]
        masters = {redis_cluster.master_of(f"optim:{{s:{sid}}}:rec")[0] for sid in ids}
        assert len(masters) >= 2  # sessions spread over shards by id
        for k in range(10):
            for sid in ids:
                assert step(a.url if k % 2 else b.url, sid, k).status_code == 200
        for sid in ids:
            answer = httpx.get(f"{b.url}/v1/sessions/{sid}/params").json()
            assert answer["step"] == 10
            np.testing.assert_array_equal(answer["params"], after_one_hot_steps(10))
    finally:
        a.stop()
        b.stop()


def test_a_masters_failover_loses_no_step_its_replica_acknowledged(tmp_path):
    cluster = RedisCluster(tmp_path)
    server = ServerProcess("--store", cluster.url, env={"OPTIM_REDIS_WAIT_REPLICAS": "1",
                                                        "OPTIM_STORE_TIMEOUT_SECONDS": "2"})
    try:
        sid = create(server.url)
        for k in range(25):
            assert step(server.url, sid, k, headers={"Idempotency-Key": f"k{k}"}).status_code == 200
        master, replica = cluster.master_of(f"optim:{{s:{sid}}}:rec")
        cluster.procs[master].kill()  # kill -9: nothing flushed, nothing handed over
        cluster.procs[master].wait()
        with ThreadPoolExecutor(1) as pool:  # a read meets the dead master, and waits out the promotion
            during = pool.submit(httpx.get, f"{server.url}/v1/sessions/{sid}/params", timeout=30)
            time.sleep(0.3)
            cluster.cli(replica, "cluster", "failover", "takeover")
            answer = during.result()
        assert answer.status_code == 200 and answer.json()["step"] == 25, answer.text
        cluster.wait_ok()
        answer = httpx.get(f"{server.url}/v1/sessions/{sid}/params", timeout=30)
        assert answer.status_code == 200 and answer.json()["step"] == 25, answer.text
        np.testing.assert_array_equal(answer.json()["params"], after_one_hot_steps(25))
        # a retried step is still answered once: its claim was replicated with it
        again = step(server.url, sid, 24, headers={"Idempotency-Key": "k24"})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"

        # the promoted master has no replica now: a step cannot be acknowledged as asked, so it is not
        refused = step(server.url, sid, 25, headers={"Idempotency-Key": "k25"})
        assert refused.status_code == 503 and "Idempotency-Key" in refused.json()["detail"]
        cluster.start(master)  # the old master comes back as the new one's replica
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            retried = step(server.url, sid, 25, headers={"Idempotency-Key": "k25"})
            if retried.status_code == 200:
                break
            time.sleep(0.5)
        assert retried.status_code == 200 and retried.json()["step"] == 26  # applied once, whichever try took
        final = httpx.get(f"{server.url}/v1/sessions/{sid}/params").json()
        np.testing.assert_array_equal(final["params"], after_one_hot_steps(26))
    finally:
        server.stop()
        cluster.stop()
