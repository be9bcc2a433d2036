"""A binary step on the memory store reads its body straight into its working copy's parameters
(``SessionService.binary_memory``): the same numbers as any other step, one parameter-sized copy
less at its peak (bench/memory.py), and refusals that still change nothing."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from optim_service.api.codecs.octet_stream import decode_binary
from optim_service.app import create_app
from optim_service.settings import Settings

OCTETS = {"content-type": "application/octet-stream"}
VARIANTS = [
    {"type": "adam", "lr": 0.1},
    {"type": "adam", "lr": 0.1, "amsgrad": True, "weight_decay": 0.01},
    {"type": "adam", "lr": 0.1, "betas": [0.4, 0.9]},  # beta1 below 0.5: the numpy reference, not a kernel
    {"type": "adamw", "lr": 0.1},
    {"type": "rmsprop", "lr": 0.01},
    {"type": "rmsprop", "lr": 0.01, "centered": True},  # the numpy reference too
    {"type": "rmsprop", "lr": 0.01, "momentum": 0.9},
    {"type": "adagrad", "lr": 0.1},
    {"type": "sgd", "lr": 0.1},
    {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
]


@pytest.fixture(params=[True, False], ids=["kernels", "reference"])
async def app(request):
    """The memory store (conftest's ``client`` talks to it), with the kernels and with the reference."""
    application = create_app(Settings(store="memory", fused_kernels=request.param))
    async with application.router.lifespan_context(application):
        yield application


async def session(client, optimizer, params, **extra) -> str:
    r = await client.post("/v1/sessions", json={"optimizer": optimizer, "params": params, "dtype": "float32", **extra})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def state(client, sid) -> dict:
    r = await client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize("optimizer", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
async def test_binary_steps_equal_json_steps_bit_for_bit(client, optimizer):
    rng = np.random.default_rng(7)
    params = {"w": rng.standard_normal((3, 4)).astype("<f4").tolist(), "b": rng.standard_normal(5).astype("<f4").tolist()}
    by_body, by_json = await session(client, optimizer, params), await session(client, optimizer, params)
    for _ in range(3):
        w, b = rng.standard_normal((3, 4)).astype("<f4"), rng.standard_normal(5).astype("<f4")
        r = await client.post(f"/v1/sessions/{by_body}/step", content=w.tobytes() + b.tobytes(), headers=OCTETS)
        assert r.status_code == 200, r.text
        exact = {k: {"shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()} for k, v in (("w", w), ("b", b))}
        r = await client.post(f"/v1/sessions/{by_json}/step", json={"gradients": exact})
        assert r.status_code == 200, r.text
    assert await state(client, by_body) == await state(client, by_json)


async def test_the_stored_session_is_the_memory_the_body_was_read_into(app, client):
    sid = await session(client, {"type": "adam", "lr": 0.1}, [1.0, 2.0, 3.0])
    sessions = app.state.sessions
    memory = sessions.binary_memory(None, sid, 12)
    assert memory is not None and sessions.binary_memory(None, sid, 8) is None  # a wrong length reads apart
    assert sessions.binary_memory("someone else", sid, 12) is None and sessions.binary_memory(None, "nope", 12) is None
    body = memoryview(memory)[:12]
    body[:] = np.array([0.5, -0.5, 1.0], "<f4").tobytes()
    result = await sessions.step(None, sid, lambda s: decode_binary(body, s.layout), memory=memory)
    assert result.session.buffer is memory and result.session.step == 1
    stored = await sessions.store.get(sid)
    assert np.shares_memory(np.frombuffer(stored.data, np.uint8), memory)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32, requires_grad=True)
    w.grad = torch.tensor([0.5, -0.5, 1.0])
    torch.optim.Adam([w], lr=0.1).step()
    np.testing.assert_array_equal(result.session.params[0], w.detach().numpy())


async def test_a_shared_store_reads_the_body_apart(tmp_path):
    application = create_app(Settings(store=f"sqlite:///{tmp_path}/s.db"))
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://test") as client:
            sid = await session(client, {"type": "sgd", "lr": 0.1}, [1.0, 2.0])
        assert application.state.sessions.binary_memory(None, sid, 8) is None


@pytest.mark.parametrize("gradient,fragments", [
    ([np.nan, 1.0], ["gradient 'w': non-finite at index [0]", "in the gradient sent or in the update"]),
    ([1.0, 1e30], ["gradient 'w': non-finite at index [1]", "may also overflow float32"]),  # g² overflows
])
async def test_a_refused_binary_step_says_where_and_changes_nothing(client, gradient, fragments):
    sid = await session(client, {"type": "adam", "lr": 0.1}, {"w": [1.0, 2.0]})
    before = await state(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", content=np.array(gradient, "<f4").tobytes(), headers=OCTETS)
    assert r.status_code == 422 and "Traceback" not in r.text
    for fragment in fragments:
        assert fragment in r.json()["detail"], r.json()["detail"]
    assert await state(client, sid) == before
    r = await client.post(f"/v1/sessions/{sid}/step", content=np.array([0.5, 0.5], "<f4").tobytes(), headers=OCTETS)
    assert r.status_code == 200 and r.json()["step"] == 1


def test_a_large_binary_body_goes_straight_into_the_steps_memory():
    """Past its first part, a binary step's body is read from the socket into the step's memory
    (``connection.BodySink``), around the HTTP parser: sent in uneven pieces, slowly, it makes the
    same step as a JSON body; a request sent right behind it on the connection is parsed as its
    own; a client gone halfway changes nothing and the server goes on."""
    import base64
    import socket
    import time

    import httpx

    from conftest import ServerProcess

    server = ServerProcess("--store", "memory")
    try:
        n = 1 << 18
        rng = np.random.default_rng(5)
        grad = rng.standard_normal(n).astype(np.float32)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ids = [http.post("/v1/sessions", json={"params": {"w": [0.5] * n}, "optimizer": {"type": "adam"}}).json()["id"]
                   for _ in range(2)]
            warm = np.zeros(n, np.float32).tobytes()
            for sid in ids:  # warm, so that the step reads its body into memory of its own
                assert http.post(f"/v1/sessions/{sid}/step", content=warm,
                                 headers={"Content-Type": "application/octet-stream"}).status_code == 200
            exact = {"w": {"shape": [n], "b64": base64.b64encode(grad.tobytes()).decode()}}
            by_json = http.post(f"/v1/sessions/{ids[1]}/step", json={"gradients": exact},
                                headers={"Accept": "application/octet-stream"}).content

            body = grad.tobytes()
            head = (f"POST /v1/sessions/{ids[0]}/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    f"Accept: application/octet-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head.encode() + body[:1001])
                at = 1001
                while at < len(body):
                    piece = int(rng.integers(1, 200_000))
                    sock.sendall(body[at:at + piece])
                    at += piece
                    time.sleep(0.001)
                answer = b""
                while chunk := sock.recv(1 << 20):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert answer.split(b"\r\n\r\n", 1)[1] == by_json

            # two steps pipelined: the second's head lies in the socket right behind the first's body
            keep = head.replace("Connection: close", "Connection: keep-alive").encode()
            then = f"GET /v1/sessions/{ids[0]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(keep + body + keep + body + then)
                answer = b""
                while chunk := sock.recv(1 << 20):
                    answer += chunk
            assert answer.count(b"HTTP/1.1 200") == 3, answer[:300]
            first, second, third = answer.split(b"HTTP/1.1 200")[1:]
            assert b'etag: "3"' in first and b'etag: "4"' in second and b'"step":4' in third

            with socket.create_connection(("127.0.0.1", server.port)) as sock:  # gone halfway
                sock.sendall(head.encode() + body[: len(body) // 2])
                time.sleep(0.3)
            state = http.get(f"/v1/sessions/{ids[0]}").json()
            assert state["step"] == 4
            again = http.post(f"/v1/sessions/{ids[0]}/step", content=body,
                              headers={"Content-Type": "application/octet-stream"})
            assert again.status_code == 200 and again.headers["etag"] == '"5"'

            # an Idempotency-Key's digest is taken as the body arrives: a retry is recognised, and a body
            # that differs only in its last byte (read past the parser) is not taken for it
            keyed = {"Content-Type": "application/octet-stream", "Idempotency-Key": "sink-1"}
            first = http.post(f"/v1/sessions/{ids[0]}/step", content=body, headers=keyed)
            retry = http.post(f"/v1/sessions/{ids[0]}/step", content=body, headers=keyed)
            assert first.headers["etag"] == retry.headers["etag"] == '"6"'
            assert retry.headers["idempotent-replayed"] == "true" and retry.content == first.content
            changed = body[:-1] + bytes([body[-1] ^ 1])
            other = http.post(f"/v1/sessions/{ids[0]}/step", content=changed, headers=keyed)
            assert other.status_code == 422 and "different request" in other.json()["detail"]
            assert http.get(f"/v1/sessions/{ids[0]}").json()["step"] == 6
    finally:
        server.stop()
