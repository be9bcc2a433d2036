"""Safe to expose: API keys, tenant isolation, limits, and hostile input."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest
import redis

from conftest import ServerProcess
from optim_service.app import create_app
from optim_service.errors import InvalidRequest
from optim_service.settings import Settings

KEY_A, KEY_B = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210"
BODY = {"optimizer": {"type": "adam", "lr": 0.1}, "params": {"w": [1.0, 2.0]}}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class App:
    """An app in-process with its lifespan running, and an httpx client on it."""

    def __init__(self, **settings):
        self.app = create_app(Settings(**{"store": "memory", **settings}))

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")
        return self.client

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)


# --- keys and tenants ---------------------------------------------------------------------------

async def test_every_v1_route_needs_a_valid_key():
    async with App(api_keys=f"{KEY_A},{KEY_B}") as client:
        for method, path in [("GET", "/v1/optimizers"), ("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                             ("GET", "/v1/sessions/x"), ("POST", "/v1/sessions/x/step"),
                             ("GET", "/v1/sessions/x/params"), ("GET", "/v1/sessions/x/state"),
                             ("DELETE", "/v1/sessions/x")]:
            r = await client.request(method, path, json=BODY)
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["content-type"] == "application/problem+json"
        r = await client.get("/v1/optimizers", headers={"Authorization": "Basic " + KEY_A})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        r = await client.get("/v1/optimizers", headers=auth("sk-wrong"))
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        assert (await client.get("/v1/optimizers", headers=auth(KEY_B))).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/docs")).status_code == 200


async def test_docs_can_be_turned_off():
    async with App(api_keys=KEY_A, expose_docs=False) as client:
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 404


async def test_keys_from_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{KEY_A}  # alice\n\n{KEY_B}\n")
    async with App(api_keys_file=str(keys)) as client:
        assert (await client.get("/v1/sessions", headers=auth(KEY_A))).status_code == 200
        assert (await client.get("/v1/sessions", headers=auth(KEY_B))).status_code == 200
        assert (await client.get("/v1/sessions", headers=auth("# operators"))).status_code == 401


async def test_another_tenant_can_neither_see_nor_touch_a_session():
    async with App(api_keys=f"{KEY_A},{KEY_B}") as client:
        sid = (await client.post("/v1/sessions", json=BODY, headers=auth(KEY_A))).json()["id"]
        before = (await client.get(f"/v1/sessions/{sid}/state", headers=auth(KEY_A))).json()
        for method, path, body in [("GET", "", None), ("GET", "/params", None), ("GET", "/state", None),
                                   ("POST", "/step", {"gradients": {"w": [1.0, 1.0]}}), ("DELETE", "", None)]:
            r = await client.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=auth(KEY_B))
            assert r.status_code == 404, (method, path, r.text)
        binary = np.ones(2, "<f4").tobytes()
        r = await client.post(f"/v1/sessions/{sid}/step", content=binary,
                              headers={**auth(KEY_B), "content-type": "application/octet-stream"})
        assert r.status_code == 404
        assert (await client.get("/v1/sessions", headers=auth(KEY_B))).json()["sessions"] == []
        assert [s["id"] for s in (await client.get("/v1/sessions", headers=auth(KEY_A))).json()["sessions"]] == [sid]
        assert (await client.get(f"/v1/sessions/{sid}/state", headers=auth(KEY_A))).json() == before


async def test_keys_are_stored_only_as_digests(tmp_path):
    db = tmp_path / "keys.db"
    async with App(api_keys=KEY_A, store=f"sqlite:///{db}") as client:
        await client.post("/v1/sessions", json=BODY, headers=auth(KEY_A))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert KEY_A.encode() not in stored
    assert len(stored) > 0


def test_keys_never_reach_the_logs():
    server = ServerProcess("--store", "memory", env={"OPTIM_API_KEYS": KEY_A})
    try:
        r = httpx.post(f"{server.url}/v1/sessions", json=BODY, headers=auth(KEY_A))
        assert r.status_code == 201
        httpx.get(f"{server.url}/v1/sessions", headers=auth("sk-not-a-key"))
    finally:
        server.stop()
    logs = server.logs()
    access = [json.loads(line) for line in logs.splitlines() if '"optim_service.access"' in line]
    assert {(a["method"], a["path"], a["status"]) for a in access} >= {("POST", "/v1/sessions", 201),
                                                                       ("GET", "/v1/sessions", 401)}
    assert KEY_A not in logs and "sk-not-a-key" not in logs


# --- limits -------------------------------------------------------------------------------------

async def test_rate_limit_per_key_with_retry_after():
    async with App(api_keys=f"{KEY_A},{KEY_B}", rate_limit_per_second=1, rate_limit_burst=3) as client:
        codes = [(await client.get("/v1/sessions", headers=auth(KEY_A))).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await client.get("/v1/sessions", headers=auth(KEY_A))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "rate limit" in r.json()["detail"]
        assert (await client.get("/v1/sessions", headers=auth(KEY_B))).status_code == 200


async def test_rate_limit_is_shared_by_replicas_through_redis(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    settings = dict(api_keys=KEY_A, store=redis_url, rate_limit_per_second=0.5, rate_limit_burst=4)
    async with App(**settings) as one, App(**settings) as two:
        codes = [(await c.get("/v1/sessions", headers=auth(KEY_A))).status_code for c in (one, two, one, two, one)]
        assert codes == [200, 200, 200, 200, 429]


async def test_sessions_per_key():
    async with App(api_keys=f"{KEY_A},{KEY_B}", max_sessions_per_key=2) as client:
        for _ in range(2):
            assert (await client.post("/v1/sessions", json=BODY, headers=auth(KEY_A))).status_code == 201
        r = await client.post("/v1/sessions", json=BODY, headers=auth(KEY_A))
        assert r.status_code == 429 and "maximum of 2 sessions" in r.json()["detail"]
        assert (await client.post("/v1/sessions", json=BODY, headers=auth(KEY_B))).status_code == 201


async def test_elements_tensors_and_depth_limits():
    async with App(max_elements_per_session=10, max_tensors_per_session=2, max_json_depth=6) as client:
        r = await client.post("/v1/sessions", json={**BODY, "params": [0.0] * 11})
        assert r.status_code == 422 and "11 elements" in r.json()["detail"]
        r = await client.post("/v1/sessions", json={**BODY, "params": {"a": [1.0], "b": [1.0], "c": [1.0]}})
        assert r.status_code == 422 and "3 tensors" in r.json()["detail"]
        deep = {**BODY, "params": [[[[[[[1.0]]]]]]]}
        r = await client.post("/v1/sessions", json=deep)
        assert r.status_code == 422 and "deeper than 6" in r.json()["detail"]
        assert (await client.get("/v1/sessions")).json()["sessions"] == []


@pytest.mark.parametrize("pad", [0, 1 << 16])  # below and above where the bracket count goes to numpy
def test_the_json_depth_check_counts_nesting_not_brackets_at_any_size(pad):
    import orjson

    from optim_service.api.limits import check_json_depth

    filler = [0.125] * (pad // 6)
    deep = orjson.dumps({"pad": filler, "w": [[[[[[[1.0]]]]]]]})
    with pytest.raises(InvalidRequest, match="deeper than 6"):
        check_json_depth(deep, 6)
    wide = orjson.dumps({"pad": filler, "w": [[[1.0]]] * 1000})  # 3000 brackets, 4 levels
    quoted = orjson.dumps({"pad": filler, "w": [1.0], "note": "[{" * 1000})  # brackets in a string
    for body in (wide, quoted):
        check_json_depth(body, 6)
    assert len(deep) > pad


async def test_body_limit_by_content_length_and_while_streaming():
    async with App(max_body_bytes=4096) as client:
        r = await client.post("/v1/sessions", content=b"{" + b" " * 5000 + b"}",
                              headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

        async def chunks():
            for _ in range(10):
                yield b" " * 1000

        r = await client.post("/v1/sessions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        assert r.headers["connection"] == "close"  # the rest of the body is not read

        sid = (await client.post("/v1/sessions", json=BODY)).json()["id"]
        for content in (b"\0" * 5000, chunks()):  # a step's body: declared, then streamed
            r = await client.post(f"/v1/sessions/{sid}/step", content=content,
                                  headers={"content-type": "application/octet-stream"})
            assert r.status_code == 413 and "4096 bytes" in r.json()["detail"], r.text
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def send_chunked(port: int, total: int, declared: int | None = None) -> bytes:
    """Stream ``total`` bytes to a real server (chunked, or with a Content-Length); return its answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {declared}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
    sock.sendall((head + "\r\n").encode())
    chunk = b" " * 65536
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return answer


def test_a_real_servers_step_whose_whole_body_is_in_still_meets_the_limit():
    """A small body arrives with its headers and the server hands it over whole (connection.WHOLE_BODY):
    over the limit, declared or chunked, it is still a 413 that changes nothing."""
    server = ServerProcess("--store", "memory", env={"OPTIM_MAX_BODY_BYTES": "4096"})
    try:
        sid = httpx.post(f"{server.url}/v1/sessions", json=BODY).json()["id"]
        padded = b'{"gradients": {"w": [0.5, 0.5]}' + b" " * 5000 + b"}"
        url = f"{server.url}/v1/sessions/{sid}/step"
        declared = httpx.post(url, content=padded, headers={"content-type": "application/json"})
        chunked = httpx.post(url, content=iter([padded[:3000], padded[3000:]]), headers={"content-type": "application/json"})
        fits = httpx.post(url, content=b'{"gradients": {"w": [0.5, 0.5]}}', headers={"content-type": "application/json"})
        for r in (declared, chunked):
            assert r.status_code == 413 and "4096 bytes" in r.json()["detail"] and r.headers["connection"] == "close"
        assert fits.status_code == 200 and fits.json()["step"] == 1
    finally:
        server.stop()


def test_real_server_refuses_twice_the_limit_with_memory_flat():
    limit = 8 << 20
    server = ServerProcess("--store", "memory", env={"OPTIM_MAX_BODY_BYTES": str(limit)})
    try:
        before = rss_kib(server.proc.pid)
        chunked = send_chunked(server.port, 2 * limit)
        declared = send_chunked(server.port, 2 * limit, declared=2 * limit)
        for _ in range(3):
            chunked_again = send_chunked(server.port, 2 * limit)
        time.sleep(0.2)
        grown_mib = (rss_kib(server.proc.pid) - before) / 1024
        assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
        assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
        assert chunked_again.startswith(b"HTTP/1.1 413")
        assert grown_mib < 2 * limit / (1 << 20), f"server grew {grown_mib:.1f} MiB"
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.stop()


# --- hostile input ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,fragment", [
    (b'{"optimizer": {"type": "adam"}, "params": [1e999]}', "not valid JSON"),
    (b'{"optimizer": {"type": "adam"}, "params": [NaN]}', "not valid JSON"),
    (b'{"optimizer": {"type": "adam"}, "params": [Infinity]}', "not valid JSON"),
    (b'{"optimizer": {"type": "adam"}, "params": ["NaN"]}', "number"),
    (b'{"optimizer": {"type": "adam"}, "params": {"w": {"shape": [100000, 100000, 100000], "b64": "AAAA"}}}',
     "needs"),
    (b'{"optimizer": {"type": "adam"}, "params": {"w": {"shape": [1], "b64": "AAA"}}}', "base64"),
    (b'{"optimizer": {"type": "adam"}, "params": {"w": {"shape": [4294967296, 4294967296, 0], "b64": ""}}}',
     "too large"),
    (b'{"optimizer": {"type": "adam"}, "params": [1.0, 2.0', "not valid JSON"),
    (b'{"optimizer": {"type": "adam"}, "params": [1.0], "owner": "someone-else"}', "owner"),
    (b'{"optimizer": {"type": "adam"}, "params": [1.0], "id": "chosen"}', "id"),
    (b'{"optimizer": {"type": "adam", "lr": null}, "params": [1.0]}', "lr"),
    (b'{"optimizer": {"type": "adam", "lr": 1e400}, "params": [1.0]}', "not valid JSON"),
    (b'\xff\xfe{}', "not valid JSON"),
])
async def test_hostile_create_bodies_get_a_clean_422(raw, fragment):
    async with App() as client:
        r = await client.post("/v1/sessions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and fragment in r.json()["detail"], r.text
        assert (await client.get("/v1/sessions")).json()["sessions"] == []
