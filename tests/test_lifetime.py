"""Session lifetime through the API on every backend: idle TTL → 404, and the session cap → 429."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis

from optim_service.app import create_app
from optim_service.settings import Settings


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
        return url
    return {"memory": "memory", "sqlite": f"sqlite:///{tmp_path}/life.db"}[request.param]


async def serve(settings: Settings):
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    return app, lifespan, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


BODY = {"optimizer": {"type": "sgd", "lr": 0.1}, "params": [1.0, 2.0]}


async def test_idle_sessions_expire_and_answer_404(store_url):
    # a step every 0.5 s keeps a 2 s TTL alive with 1.5 s to spare (under a 1 s TTL the margin was
    # 0.5 s, and a loaded machine once lost the busy session); 2.5 s idle outlives it
    app, lifespan, client = await serve(Settings(store=store_url, session_ttl_seconds=2, sweep_interval_seconds=0.2))
    try:
        idle = (await client.post("/v1/sessions", json=BODY)).json()["id"]
        busy = (await client.post("/v1/sessions", json=BODY)).json()["id"]
        for _ in range(5):
            await asyncio.sleep(0.5)
            assert (await client.post(f"/v1/sessions/{busy}/step", json={"gradients": [1.0, 1.0]})).status_code == 200
        r = await client.get(f"/v1/sessions/{idle}")
        assert r.status_code == 404 and idle in r.json()["detail"]
        assert (await client.post(f"/v1/sessions/{idle}/step", json={"gradients": [1.0, 1.0]})).status_code == 404
        assert [s["id"] for s in (await client.get("/v1/sessions")).json()["sessions"]] == [busy]
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_session_cap_refuses_creates_with_429(store_url):
    app, lifespan, client = await serve(Settings(store=store_url, max_sessions=2))
    try:
        first = (await client.post("/v1/sessions", json=BODY)).json()["id"]
        await client.post("/v1/sessions", json=BODY)
        r = await client.post("/v1/sessions", json=BODY)
        assert r.status_code == 429 and "maximum of 2 sessions" in r.json()["detail"]
        assert (await client.delete(f"/v1/sessions/{first}")).status_code == 204
        assert (await client.post("/v1/sessions", json=BODY)).status_code == 201
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
