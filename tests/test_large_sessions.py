"""A session larger than one Redis value (512 MB): 100M float32 parameters with Adam keep 1.2 GB of
state, which the Redis store splits into chunks; it steps, and its checkpoint resumes bit-exactly."""

from __future__ import annotations

import json

import httpx
import numpy as np
import safetensors.numpy

from conftest import ServerProcess

N = 100_000_000
ST, OCTET = "application/vnd.safetensors", "application/octet-stream"


def test_a_100m_parameter_adam_session_steps_on_redis_and_resumes_bit_exactly(redis_url):
    # the local cache (version-checked) spares each step a 1.2 GB read back; the contract suite reads
    # chunked records back on every Redis backend (4 KiB chunks there)
    server = ServerProcess("--store", redis_url, env={"OPTIM_MAX_BODY_BYTES": str(2 << 30), "OPTIM_CACHE_BYTES": str(4 << 30),
                                                      "OPTIM_STORE_TIMEOUT_SECONDS": "60"})
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            doc = {"schema_version": 1, "optimizer": {"type": "adam", "lr": 1e-3}, "dtype": "float32",
                   "structure": "object", "names": ["w"], "state": {"step": 0}}
            params = np.linspace(-1, 1, N, dtype=np.float32)
            body = safetensors.numpy.save({"params/w": params}, metadata={"checkpoint": json.dumps(doc)})
            del params
            created = http.post("/v1/sessions", content=body, headers={"Content-Type": ST, "Prefer": "return=minimal"})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            del body
            grads = [np.full(N, g, np.float32) for g in (0.5, -0.25)]
            for g in grads[:1]:
                step = http.post(f"/v1/sessions/{sid}/step", content=g.tobytes(),
                                 headers={"Content-Type": OCTET, "Accept": OCTET})
                assert step.status_code == 200, step.text
            checkpoint = http.get(f"/v1/sessions/{sid}/state", headers={"Accept": ST}).content
            assert len(checkpoint) > 3 * 4 * N  # params, exp_avg, exp_avg_sq: past one Redis value twice over
            resumed = http.post("/v1/sessions", content=checkpoint, headers={"Content-Type": ST,
                                                                             "Prefer": "return=minimal"})
            assert resumed.status_code == 201, resumed.text
            copy = resumed.json()["id"]
            assert resumed.headers["etag"] == '"1"'
            del checkpoint
            one, two = (http.post(f"/v1/sessions/{s}/step", content=grads[1].tobytes(),
                                  headers={"Content-Type": OCTET, "Accept": OCTET}) for s in (sid, copy))
            assert one.status_code == two.status_code == 200
            assert one.headers["etag"] == two.headers["etag"] == '"2"'
            assert one.content == two.content  # bit for bit
            new = np.frombuffer(one.content, np.float32)
            assert new.size == N and np.isfinite(new[:: 1 << 16]).all()
            for s in (sid, copy):  # 2.4 GB the suite's shared Redis need not keep
                assert http.delete(f"/v1/sessions/{s}").status_code == 204
    finally:
        server.stop()


async def test_a_session_too_large_for_its_store_is_refused_at_create_and_nothing_is_made(client, monkeypatch):
    """SQLite keeps one value up to 1 GB and Redis a round's sum up to 512 MB: here those limits are
    lowered to 1,000 bytes, and a session past them is a 422 that names the limit."""
    from optim_service.store.redis import RedisStore
    from optim_service.store.sqlite import SQLiteStore

    monkeypatch.setattr(SQLiteStore, "max_record_bytes", 1000)
    monkeypatch.setattr(RedisStore, "max_round_bytes", 1000)
    store = client._transport.app.state.sessions.store
    record_limit, round_limit = store.max_record_bytes, store.max_round_bytes
    big = {"optimizer": {"type": "adam"}, "dtype": "float32", "params": {"w": [0.0] * 100}}  # 1,200 bytes of state
    answer = await client.post("/v1/sessions", json=big)
    if record_limit is not None:
        assert answer.status_code == 422 and "1000" in answer.json()["detail"] and "SQLite" in answer.json()["detail"]
    else:
        assert answer.status_code == 201
    sync = {**big, "params": {"w": [0.0] * 300}, "aggregation": {"mode": "sync", "contributions": 2}}  # a 1,200-byte sum
    answer = await client.post("/v1/sessions", json=sync)
    if round_limit is not None and record_limit is None:
        assert answer.status_code == 422 and "synchronous round" in answer.json()["detail"]
    listed = (await client.get("/v1/sessions")).json()["sessions"]
    assert len(listed) == (record_limit is None) + (record_limit is None and round_limit is None)
