"""A real ``optim-service serve`` process driven over loopback: raw HTTP written only from DESIGN.md
gets torch's numbers, and the SDK (sync and async) trains through it."""

from __future__ import annotations

import json
import http.client
from urllib.parse import urlparse

import numpy as np
import pytest

from optim_client import AsyncOptimClient, NotFoundError, OptimClient, UnprocessableEntityError
from torch_oracle import run_torch

TOL = {"float64": dict(rtol=1e-7, atol=0), "float32": dict(rtol=1e-5, atol=1e-6)}


def raw(server, method, path, body=None, headers=None):
    """Plain http.client: no SDK, no httpx."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


CASES = [
    {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"type": "adagrad", "lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    {"type": "rmsprop", "lr": 0.01, "centered": True, "momentum": 0.5, "maximize": True},
    {"type": "adam", "lr": 0.02, "amsgrad": True, "weight_decay": 0.1},
    {"type": "adamw", "lr": 0.02, "betas": [0.8, 0.99]},
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("wire", ["json", "binary"])
@pytest.mark.parametrize("optimizer", CASES, ids=[c["type"] for c in CASES])
def test_raw_http_client_gets_torch_numbers(server, optimizer, wire, dtype):
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    grads = [{n: rng.normal(size=v.shape) for n, v in params.items()} for _ in range(25)]
    schedule = {"type": "step", "step_size": 10, "gamma": 0.5}
    body = {"optimizer": optimizer, "dtype": dtype, "schedule": schedule,
            "params": {n: v.tolist() for n, v in params.items()}}
    status, headers, data = raw(server, "POST", "/v1/sessions", json.dumps(body), {"Content-Type": "application/json"})
    assert status == 201, data
    sid = json.loads(data)["id"]
    np_dtype = np.dtype("<f4" if dtype == "float32" else "<f8")
    for g in grads:
        if wire == "json":
            status, headers, data = raw(server, "POST", f"/v1/sessions/{sid}/step",
                                        json.dumps({"gradients": {n: v.tolist() for n, v in g.items()}}),
                                        {"Content-Type": "application/json"})
            out = {n: np.asarray(v, dtype=np_dtype) for n, v in json.loads(data)["params"].items()}
        else:
            payload = b"".join(g[n].astype(np_dtype).tobytes() for n in ("w", "b"))
            status, headers, data = raw(server, "POST", f"/v1/sessions/{sid}/step", payload,
                                        {"Content-Type": "application/octet-stream",
                                         "Accept": "application/octet-stream"})
            flat = np.frombuffer(data, np_dtype)
            out = {"w": flat[:12].reshape(4, 3), "b": flat[12:]}
        assert status == 200
    assert headers["etag"] == '"25"'
    expected, _ = run_torch(optimizer, params, grads, dtype=dtype, schedule=schedule)
    for n in params:
        np.testing.assert_allclose(out[n], expected[n], **TOL[dtype])


def test_sdk_sync_trains_a_linear_model_like_torch(server):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 3))
    y = X @ np.array([1.5, -2.0, 0.5]) + 0.3
    w0, b0 = np.zeros(3), np.zeros(1)

    def grads(w, b):
        err = X @ w + b - y
        return {"w": 2 * X.T @ err / len(y), "b": np.array([2 * err.mean()])}

    with OptimClient(server.url) as client:
        session = client.create_session({"w": w0, "b": b0}, optimizer="adam", lr=0.1)
        assert session.layout.dtype == "float64" and session.step_count == 0
        params = session.params
        history = []
        for _ in range(200):
            g = grads(params["w"], params["b"])
            history.append(g)
            params = session.step(g)
        assert session.step_count == 200 and isinstance(params, dict)
        assert params["w"].dtype == np.float64
        np.testing.assert_allclose(params["w"], [1.5, -2.0, 0.5], atol=1e-2)
        expected, _ = run_torch({"type": "adam", "lr": 0.1}, {"w": w0, "b": b0}, history)
        np.testing.assert_allclose(params["w"], expected["w"], rtol=1e-7)
        same = client.get_session(session.id)
        assert same.step_count == 200
        np.testing.assert_array_equal(same.params["w"], params["w"])
        assert session.id in [s["id"] for s in client.list_sessions()["sessions"]]
        session.delete()
        with pytest.raises(NotFoundError) as err:
            session.step(g)
        assert session.id in err.value.detail


def test_sdk_array_in_array_out_json_for_small_and_loss(server):
    with OptimClient(server.url) as client:
        session = client.create_session(np.ones((2, 2), np.float32), optimizer="sgd", lr=0.5)
        out = session.step(np.ones((2, 2)), loss=3.0)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 2)
        np.testing.assert_array_equal(out, np.full((2, 2), 0.5, np.float32))
        with pytest.raises(UnprocessableEntityError) as err:
            session.step(np.ones((3, 2)))
        assert "expected shape [2, 2], got [3, 2]" in err.value.detail
        assert session.step_count == 1
        checkpoint = session.state()
        resumed = client.restore(checkpoint)
        assert resumed.step_count == 1
        np.testing.assert_array_equal(resumed.step(np.ones((2, 2))), session.step(np.ones((2, 2))))
        catalogue = client.optimizers()
        assert {o["type"] for o in catalogue} >= {"adam", "sgd"}


async def test_sdk_async_twin(server):
    async with AsyncOptimClient(server.url) as client:
        big = {"w": np.linspace(-1, 1, 10_000, dtype=np.float32).reshape(100, 100)}
        session = await client.create_session(big, optimizer="rmsprop", lr=0.01, square_avg_init="first_grad")
        for _ in range(3):
            out = await session.step({"w": np.ones((100, 100), np.float32)})  # binary wire
        assert session.step_count == 3 and out["w"].dtype == np.float32
        expected, _ = run_torch({"type": "rmsprop", "lr": 0.01}, {"w": big["w"]},
                                [{"w": np.ones((100, 100))}] * 3, dtype="float32", first_grad_square_avg=True)
        np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5, atol=1e-6)
        await session.delete()


def test_sdk_reconnects_when_the_server_dropped_its_idle_connection(tmp_path):
    """The SDK's http.client transport notices a keep-alive connection the server closed."""
    from conftest import ServerProcess
    from optim_client import APIConnectionError

    store = f"sqlite:///{tmp_path}/db.sqlite"
    first = ServerProcess("--store", store)
    port = first.port
    with OptimClient(first.url, max_retries=0) as client:
        session = client.create_session(np.zeros(8), optimizer="sgd", lr=1.0)
        session.step(np.ones(8))
        first.stop()  # closes the client's kept-alive socket
        with pytest.raises(APIConnectionError):
            session.step(np.ones(8))  # nothing listens: refused, reported, never half-sent
        second = ServerProcess("--store", store, "--port", str(port))
        try:
            out = session.step(np.ones(8))  # a fresh connection to the restarted server
            np.testing.assert_array_equal(out, -2 * np.ones(8))
            assert session.step_count == 2
        finally:
            second.stop()


def test_sdk_urls_keep_a_base_path_and_parse_once():
    """Behind a proxy at /optim the SDK's requests go to /optim/v1/...; each path is parsed once."""
    client = OptimClient("http://127.0.0.1:9/optim/")
    url = client._url("/v1/sessions/abc/step")
    assert str(url) == "http://127.0.0.1:9/optim/v1/sessions/abc/step"
    assert client._url("/v1/sessions/abc/step") is url
    assert str(client._url("/v1/sessions?limit=5&after=x")) == "http://127.0.0.1:9/optim/v1/sessions?limit=5&after=x"
    client.close()
