"""Every route and every error of the v1 contract, in-process through httpx's ASGI transport."""

from __future__ import annotations

import base64

import numpy as np
import pytest

PROBLEM = "application/problem+json"
NAMED = {"w": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "b": [0.5, -0.5]}
GRADS = {"w": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "b": [1.0, -1.0]}


def b64(values, dtype="<f8"):
    arr = np.asarray(values, dtype=dtype)
    return {"shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}


async def create(client, **overrides):
    body = {"optimizer": {"type": "sgd", "lr": 0.1}, "params": NAMED, "dtype": "float64", **overrides}
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def snapshot(client, sid):
    r = await client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200
    return r.json()


def assert_problem(r, status, *fragments):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    assert "Traceback" not in r.text
    return body


# --- create -------------------------------------------------------------------------------------

async def test_create_returns_201_location_etag_and_mirrors_params(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "adam"}, "params": NAMED, "dtype": "float64"})
    assert r.status_code == 201
    body = r.json()
    assert r.headers["location"] == f"/v1/sessions/{body['id']}"
    assert r.headers["etag"] == '"0"'
    assert body["step"] == 0 and body["dtype"] == "float64"
    assert body["params"] == NAMED
    assert body["shapes"] == {"w": [2, 3], "b": [2]}
    assert body["optimizer"] == {"type": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8,
                                 "weight_decay": 0.0, "amsgrad": False, "maximize": False,
                                 "decoupled_weight_decay": False}
    assert len(body["id"]) >= 22  # 128 random bits, URL-safe


async def test_create_unnamed_tensor_and_b64_mirror(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [[1, 2], [3, 4]]})
    assert r.json()["params"] == [[1.0, 2.0], [3.0, 4.0]] and r.json()["shapes"] == [2, 2]
    assert r.json()["dtype"] == "float32"
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "dtype": "float64",
                                                "params": {"x": b64([1.5, 2.5])}})
    assert r.json()["params"] == {"x": b64([1.5, 2.5])}


async def test_create_with_prefer_return_minimal_leaves_the_params_out(client):
    body = {"optimizer": {"type": "sgd"}, "params": NAMED, "dtype": "float64"}
    r = await client.post("/v1/sessions", json=body, headers={"Prefer": "respond-async, return=minimal"})
    assert r.status_code == 201 and r.headers["preference-applied"] == "return=minimal"
    assert "params" not in r.json() and r.json()["shapes"] == {"w": [2, 3], "b": [2]}
    stored = await client.get(f"/v1/sessions/{r.json()['id']}/params")
    assert stored.json()["params"] == NAMED  # the session has them all the same
    r = await client.post("/v1/sessions", json=body, headers={"Prefer": "return=representation"})
    assert "preference-applied" not in r.headers and r.json()["params"] == NAMED


@pytest.mark.parametrize("body,status,fragment", [
    ({"optimizer": {"type": "adam"}, "params": [1.0], "extra": 1}, 422, "extra"),
    ({"optimizer": {"type": "adam", "momentum": 0.9}, "params": [1.0]}, 422, "momentum"),
    ({"optimizer": {"type": "lbfgs"}, "params": [1.0]}, 422, "lbfgs"),
    ({"optimizer": {"type": "adam", "lr": -1}, "params": [1.0]}, 422, "Invalid learning rate: -1"),
    ({"optimizer": {"type": "adam", "betas": [0.9, 1.0]}, "params": [1.0]}, 422, "Invalid beta parameter at index 1"),
    ({"optimizer": {"type": "sgd", "nesterov": True}, "params": [1.0]}, 422, "Nesterov momentum requires"),
    ({"optimizer": {"type": "adagrad", "eps": -1}, "params": [1.0]}, 422, "Invalid epsilon value"),
    ({"optimizer": {"type": "rmsprop", "alpha": -0.1}, "params": [1.0]}, 422, "Invalid alpha value"),
    ({"optimizer": {"type": "adam", "lr": "0.1"}, "params": [1.0]}, 422, "lr"),
    ({"optimizer": {"type": "adam", "amsgrad": 1}, "params": [1.0]}, 422, "amsgrad"),
    ({"optimizer": {"type": "adam"}, "params": [1.0], "dtype": "float16"}, 422, "dtype"),
    ({"optimizer": {"type": "adam"}, "params": [[1.0, 2.0], [3.0]]}, 422, "ragged"),
    ({"optimizer": {"type": "adam"}, "params": [1.0, True]}, 422, "boolean"),
    ({"optimizer": {"type": "adam"}, "params": [1.0, None]}, 422, "null"),
    ({"optimizer": {"type": "adam"}, "params": [1.0, "NaN"]}, 422, "str"),
    ({"optimizer": {"type": "adam"}, "params": {}}, 422, "params"),
    ({"optimizer": {"type": "adam"}, "params": 3.0}, 422, "params"),
    ({"optimizer": {"type": "adam"}, "params": [1e300], "dtype": "float32"}, 422, "non-finite"),
    ({"optimizer": {"type": "adam"}, "params": {"x": {"shape": [3], "b64": "AAAA"}}}, 422, "needs 12 bytes"),
    ({"optimizer": {"type": "adam"}, "params": {"x": {"shape": [1], "b64": "!!!!"}}}, 422, "base64"),
    ({"optimizer": {"type": "adam"}, "params": {"x": {"shape": [-1], "b64": ""}}}, 422, "non-negative"),
    ({"optimizer": {"type": "adam"}, "params": {"x": [1.0]},
      "param_groups": [{"params": ["y"], "lr": 0.1}]}, 422, "not in params"),
    ({"optimizer": {"type": "adam"}, "params": {"x": [1.0]},
      "param_groups": [{"params": ["x"], "lr": 0.1}, {"params": ["x"]}]}, 422, "more than one parameter group"),
    ({"optimizer": {"type": "adam"}, "params": {"x": [1.0]},
      "param_groups": [{"params": ["x"], "type": "sgd"}]}, 422, "cannot change the optimizer type"),
    ({"optimizer": {"type": "adam"}, "params": {"x": [1.0]},
      "param_groups": [{"params": ["x"], "lr": -2}]}, 422, "Invalid learning rate"),
    ({"optimizer": {"type": "adam"}, "params": {"x": [1.0]},
      "param_groups": [{"params": ["x"], "nope": 1}]}, 422, "nope"),
    ({"optimizer": {"type": "adam"}, "params": [1.0], "schedule": {"type": "step"}}, 422, "step_size"),
    ({"optimizer": {"type": "adam"}, "params": [1.0], "schedule": {"type": "linear", "start_factor": 0}},
     422, "Starting multiplicative factor"),
    ({"optimizer": {"type": "adam"}, "params": [1.0], "clip_grad_norm": {"max_norm": -1}}, 422, "max_norm"),
    ({"optimizer": {"type": "adam"}, "params": [1.0], "state": {"step": 1, "buffers": {"exp_avg": [0.0]}}},
     422, "expected buffers"),
])
async def test_create_refuses_bad_input_with_a_clear_422(client, body, status, fragment):
    r = await client.post("/v1/sessions", json=body)
    assert_problem(r, status, fragment)
    listed = await client.get("/v1/sessions")
    assert listed.json()["sessions"] == []  # a refused create stores nothing


async def test_create_refuses_invalid_json_and_other_content_types(client):
    assert_problem(await client.post("/v1/sessions", content=b'{"params": [NaN]}',
                                     headers={"content-type": "application/json"}), 422, "not valid JSON")
    assert_problem(await client.post("/v1/sessions", content=b'{"params": [1e999]}',
                                     headers={"content-type": "application/json"}), 422, "not valid JSON")
    assert_problem(await client.post("/v1/sessions", content=b"[1,2]",
                                     headers={"content-type": "application/json"}), 422, "JSON object")
    assert_problem(await client.post("/v1/sessions", content=b"x=1",
                                     headers={"content-type": "application/x-www-form-urlencoded"}),
                   415, "application/json")


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/healthz", "GET, HEAD"),
    ("GET", "/v1/sessions/abc/step", "POST"),  # the step lane answers POST only: others reach the router
    ("PUT", "/v1/sessions", "GET, HEAD, POST"),
    ("POST", "/v1/sessions/abc", "DELETE, GET, HEAD"),
])
async def test_a_wrong_method_is_told_which_ones_the_path_takes(client, method, path, allowed):
    """405's Allow names the path's methods (RFC 9110), also for routes an included router holds."""
    r = await client.request(method, path)
    assert_problem(r, 405, f"it takes {allowed}")
    assert r.headers["allow"] == allowed


async def test_head_is_answered_as_the_get_it_asks_about(client):
    """RFC 9110: HEAD wherever GET goes (a load balancer's HEAD /healthz got a 405); its headers are
    the GET's. (Over a real server no body follows: test_hostile.)"""
    sid = await create(client)
    for path in ("/healthz", f"/v1/sessions/{sid}/params", f"/v1/sessions/{sid}"):
        get, head = await client.get(path), await client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers.get("etag") == get.headers.get("etag")
    assert (await client.head("/v1/sessions/nope")).status_code == 404


# --- step ---------------------------------------------------------------------------------------

async def test_step_json_updates_and_sets_etag_and_server_timing(client):
    sid = await create(client)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS, "loss": 0.25})
    assert r.status_code == 200
    assert r.headers["etag"] == '"1"'
    assert r.headers["server-timing"].startswith("compute;dur=")
    float(r.headers["server-timing"].split("dur=")[1])
    body = r.json()
    assert body["step"] == 1
    expected_w = np.array(NAMED["w"]) - 0.1 * np.array(GRADS["w"])
    np.testing.assert_array_equal(body["params"]["w"], expected_w)
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert meta["step"] == 1 and meta["loss"] == 0.25


async def test_the_documented_step_route_answers_as_the_step_lane_does(app, client):
    """The step lane serves every step before the router; its APIRoute, reached here through
    FastAPI's own stack without the service's middlewares, serves one through the same code."""
    import httpx
    from fastapi import FastAPI

    sid = await create(client)
    lane = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                             headers={"accept": "application/octet-stream"})

    without_lane = FastAPI.build_middleware_stack(app)

    async def router(scope, receive, send):
        scope["app"] = app
        await without_lane(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://test") as direct:
        routed = await direct.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                                   headers={"accept": "application/octet-stream"})
        assert_problem(await direct.post(f"/v1/sessions/{sid}/step", content=b"{}",
                                         headers={"content-type": "text/plain"}), 415, "Content-Type")
    assert lane.status_code == routed.status_code == 200
    assert (lane.headers["etag"], routed.headers["etag"]) == ('"1"', '"2"')
    assert routed.headers["content-type"] == lane.headers["content-type"] == "application/octet-stream"
    w0, g = np.array(NAMED["w"]).ravel(), np.array(GRADS["w"]).ravel()
    np.testing.assert_array_equal(np.frombuffer(lane.content, "<f8")[:6], w0 - 0.1 * g)
    np.testing.assert_array_equal(np.frombuffer(routed.content, "<f8")[:6], (w0 - 0.1 * g) - 0.1 * g)


async def test_step_mirrors_b64_per_tensor(client):
    sid = await create(client)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": b64(GRADS["w"]), "b": GRADS["b"]}})
    params = r.json()["params"]
    assert set(params["w"]) == {"shape", "b64"} and isinstance(params["b"], list)
    w = np.frombuffer(base64.b64decode(params["w"]["b64"]), "<f8").reshape(params["w"]["shape"])
    np.testing.assert_array_equal(w, np.array(NAMED["w"]) - 0.1 * np.array(GRADS["w"]))


async def test_step_binary_in_and_out(client):
    sid = await create(client)
    raw = np.concatenate([np.ravel(GRADS["w"]), np.ravel(GRADS["b"])]).astype("<f8").tobytes()
    r = await client.post(f"/v1/sessions/{sid}/step", content=raw, headers={
        "content-type": "application/octet-stream", "accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["etag"] == '"1"'
    out = np.frombuffer(r.content, "<f8")
    expected = np.concatenate([np.ravel(NAMED["w"]), np.ravel(NAMED["b"])]) - 0.1 * np.frombuffer(raw, "<f8")
    np.testing.assert_array_equal(out, expected)
    # binary in, JSON out; JSON in, binary out
    r = await client.post(f"/v1/sessions/{sid}/step", content=raw, headers={"content-type": "application/octet-stream"})
    assert r.json()["step"] == 2
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                          headers={"accept": "application/octet-stream"})
    assert len(r.content) == 8 * 8 and r.headers["etag"] == '"3"'


async def test_binary_body_of_the_wrong_length_is_refused(client):
    sid = await create(client)
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", content=b"\0" * 63,
                          headers={"content-type": "application/octet-stream"})
    assert_problem(r, 422, "expected 64 bytes", "got 63")
    nan = np.full(8, np.nan).tobytes()
    r = await client.post(f"/v1/sessions/{sid}/step", content=nan, headers={"content-type": "application/octet-stream"})
    assert_problem(r, 422, "non-finite")
    assert await snapshot(client, sid) == before


@pytest.mark.parametrize("gradients,fragment", [
    ({"w": [[0.1, 0.2], [0.4, 0.5]], "b": [1.0, -1.0]}, "gradient 'w': expected shape [2, 3], got [2, 2]"),
    ({"w": GRADS["w"]}, "missing ['b']"),
    ({**GRADS, "c": [1.0]}, "unknown ['c']"),
    ([1.0, 2.0], "named tensors"),
    ("w", "named tensors"),  # a body of gradients alone skips the model: the decoder words these
    (None, "named tensors"),
    ({"w": GRADS["w"], "b": [1.0, "NaN"]}, "gradient 'b'"),
    ({"w": GRADS["w"], "b": [1.0, False]}, "boolean"),
    ({"w": GRADS["w"], "b": [[1.0], [2.0, 3.0]]}, "ragged"),
])
async def test_bad_gradients_are_refused_and_change_nothing(client, gradients, fragment):
    sid = await create(client)
    before = await snapshot(client, sid)
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": gradients}), 422, fragment)
    assert await snapshot(client, sid) == before


async def test_step_body_errors(client):
    sid = await create(client)
    before = await snapshot(client, sid)
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS, "step": 5}), 422, "step")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={}), 422, "gradients")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS, "loss": "x"}), 422, "loss")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", content=b"{", headers={
        "content-type": "application/json"}), 422, "not valid JSON")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", content=b"abc", headers={
        "content-type": "text/plain"}), 415, "application/octet-stream")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                                     headers={"accept": "text/html"}), 406, "text/html")
    assert await snapshot(client, sid) == before


async def test_overflowing_step_is_refused_and_stores_nothing(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "adagrad"}, "params": [1.0, 2.0], "dtype": "float32"})
    sid = r.json()["id"]
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1e20, 1.0]})  # g² overflows float32
    assert_problem(r, 422, "non-finite", "nothing was changed")
    assert await snapshot(client, sid) == before


async def test_a_step_dividing_by_zero_is_refused_not_a_server_error(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "eps": 0}, "params": [1.0, 2.0],
                                                "dtype": "float32"})
    sid = r.json()["id"]
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.0, 1.0]})  # 0 / (√0 + 0)
    assert_problem(r, 422, "non-finite", "nothing was changed")
    assert await snapshot(client, sid) == before


async def test_if_match(client):
    sid = await create(client)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers={"if-match": '"0"'})
    assert r.status_code == 200
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers={"if-match": '"0"'})
    body = assert_problem(r, 412, "expected step 0", "at step 1")
    assert r.headers["etag"] == '"1"' and body["step"] == 1
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                                     headers={"if-match": "1"}), 422, "quoted step number")
    assert await snapshot(client, sid) == before
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers={"if-match": '"1"'})
    assert r.status_code == 200 and r.json()["step"] == 2


async def test_idempotency_key_replays_and_applies_once(client):
    sid = await create(client)
    headers = {"idempotency-key": "step-abc"}
    first = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers=headers)
    again = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["etag"] == '"1"'
    assert again.headers["idempotent-replayed"] == "true"
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1
    before = await snapshot(client, sid)
    other = {"w": GRADS["w"], "b": [0.0, 0.0]}
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": other}, headers=headers)
    assert_problem(r, 422, "step-abc", "different request")
    assert await snapshot(client, sid) == before
    # once the session has moved on, the old answer is gone: say so rather than apply it again
    await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS})
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS}, headers=headers)
    assert_problem(r, 409, "applied as step 1", "step 2")
    assert_problem(await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS},
                                     headers={"idempotency-key": "bad key with spaces"}), 422, "Idempotency-Key")


# --- read, list, delete, checkpoint -------------------------------------------------------------

async def test_get_metadata_params_and_binary_params(client):
    sid = await create(client, schedule={"type": "inverse_sqrt"}, clip_grad_norm={"max_norm": 1.0})
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert {"id", "step", "optimizer", "dtype", "shapes", "created_at", "updated_at"} <= set(meta)
    assert meta["schedule"] == {"type": "inverse_sqrt"}
    assert meta["clip_grad_norm"] == {"max_norm": 1.0, "norm_type": 2.0}
    assert meta["num_parameters"] == 8 and meta["created_at"].endswith("Z")
    r = await client.get(f"/v1/sessions/{sid}/params")
    assert r.json() == {"step": 0, "params": NAMED} and r.headers["etag"] == '"0"'
    r = await client.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"})
    assert r.json()["params"]["b"] == b64(NAMED["b"])
    r = await client.get(f"/v1/sessions/{sid}/params", headers={"accept": "application/octet-stream"})
    np.testing.assert_array_equal(np.frombuffer(r.content, "<f8"),
                                  np.concatenate([np.ravel(NAMED["w"]), NAMED["b"]]))


async def test_list_pages_and_delete(client):
    ids = sorted([await create(client) for _ in range(5)])
    page1 = (await client.get("/v1/sessions", params={"limit": 2})).json()
    assert [s["id"] for s in page1["sessions"]] == ids[:2] and page1["next"] == ids[1]
    page2 = (await client.get("/v1/sessions", params={"limit": 2, "after": page1["next"]})).json()
    assert [s["id"] for s in page2["sessions"]] == ids[2:4]
    page3 = (await client.get("/v1/sessions", params={"limit": 2, "after": page2["next"]})).json()
    assert [s["id"] for s in page3["sessions"]] == ids[4:] and page3["next"] is None
    assert_problem(await client.get("/v1/sessions", params={"limit": 0}), 422, "limit")
    r = await client.delete(f"/v1/sessions/{ids[0]}")
    assert r.status_code == 204 and r.content == b""
    for method, path in [("GET", ""), ("GET", "/params"), ("GET", "/state"), ("DELETE", "")]:
        assert_problem(await client.request(method, f"/v1/sessions/{ids[0]}{path}"), 404, ids[0])
    assert_problem(await client.post(f"/v1/sessions/{ids[0]}/step", json={"gradients": GRADS}), 404)


async def test_checkpoint_resumes_bit_exactly(client):
    body = {"optimizer": {"type": "adam", "lr": 0.05, "amsgrad": True}, "params": NAMED, "dtype": "float32",
            "schedule": {"type": "cosine", "T_max": 7}, "param_groups": [{"params": ["b"], "lr": 0.2}]}
    sid = (await client.post("/v1/sessions", json=body)).json()["id"]
    rng = np.random.default_rng(3)
    seq = [{"w": rng.normal(size=(2, 3)).tolist(), "b": rng.normal(size=2).tolist()} for _ in range(6)]
    for g in seq[:3]:
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": g})
    checkpoint = await snapshot(client, sid)
    assert checkpoint["state"]["step"] == 3
    assert set(checkpoint["state"]["buffers"]["w"]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    r = await client.post("/v1/sessions", json=checkpoint)
    assert r.status_code == 201 and r.headers["etag"] == '"3"'
    resumed = r.json()["id"]
    for g in seq[3:]:
        a = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": g}, headers={"accept": "application/octet-stream"})
        b = await client.post(f"/v1/sessions/{resumed}/step", json={"gradients": g}, headers={"accept": "application/octet-stream"})
        assert a.content == b.content and a.headers["etag"] == b.headers["etag"]
    original, copy = await snapshot(client, sid), await snapshot(client, resumed)
    assert original == copy


async def test_checkpoint_of_an_unnamed_tensor_round_trips(client):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "rmsprop", "centered": True, "momentum": 0.5},
                                                   "params": [1.0, 2.0]})).json()["id"]
    await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, 0.25]})
    checkpoint = await snapshot(client, sid)
    assert set(checkpoint["state"]["buffers"]) == {"square_avg", "momentum_buffer", "grad_avg"}
    resumed = (await client.post("/v1/sessions", json=checkpoint)).json()["id"]
    assert await snapshot(client, resumed) == checkpoint
    bad = {**checkpoint, "state": {"step": 1, "buffers": {**checkpoint["state"]["buffers"], "square_avg": [1.0]}}}
    assert_problem(await client.post("/v1/sessions", json=bad), 422, "square_avg", "expected shape [2]")


# --- catalogue, health, docs --------------------------------------------------------------------

async def test_optimizer_catalogue(client):
    catalogue = {o["type"]: o for o in (await client.get("/v1/optimizers")).json()}
    assert {"sgd", "adagrad", "rmsprop", "adam", "adamw", "yogi", "muon", "lion"} <= set(catalogue)
    assert catalogue["yogi"]["hyperparameters"]["initial_accumulator_value"]["default"] == 1e-6
    assert catalogue["adam"]["hyperparameters"]["betas"]["default"] == [0.9, 0.999]
    assert catalogue["adamw"]["hyperparameters"]["weight_decay"]["default"] == 0.01
    assert "decoupled_weight_decay" not in catalogue["adamw"]["hyperparameters"]
    assert catalogue["rmsprop"]["hyperparameters"]["square_avg_init"]["default"] == "zero"
    assert catalogue["adagrad"]["state_buffers"] == ["sum"]


async def test_health_docs_and_unknown_routes(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    spec = (await client.get("/openapi.json")).json()
    assert "CreateSession" in spec["components"]["schemas"]
    step_body = spec["paths"]["/v1/sessions/{session_id}/step"]["post"]["requestBody"]["content"]
    assert set(step_body) == {"application/json", "application/octet-stream", "application/vnd.safetensors",
                              "application/vnd.optim.shm+json"}
    assert (await client.get("/docs")).status_code == 200
    assert_problem(await client.get("/v1/nothing"), 404)
    assert_problem(await client.put("/v1/sessions"), 405)


async def test_clipping_reports_the_gradient_norm(client):
    sid = await create(client, clip_grad_norm={"max_norm": 0.5, "norm_type": "inf"})
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": GRADS})
    assert r.json()["grad_norm"] == 1.0  # max |g| before clipping
    np.testing.assert_allclose(r.json()["params"]["b"], np.array(NAMED["b"]) - 0.1 * 0.5 / (1 + 1e-6) * np.array(GRADS["b"]))


async def test_nan_policy_skip_leaves_state_unchanged_and_says_so(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.1}, "params": [1.0, 2.0],
                                                "dtype": "float32", "nan_policy": "skip"})
    sid = r.json()["id"]
    assert r.json()["nan_policy"] == "skip"
    await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, 0.5]})
    before = await snapshot(client, sid)
    nan = np.array([np.nan, 1.0], "<f4").tobytes()
    r = await client.post(f"/v1/sessions/{sid}/step", content=nan, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["skipped"] is True and r.json()["step"] == 1
    assert r.headers["etag"] == '"1"' and r.headers["optim-step-skipped"] == "true"
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"shape": [2], "b64": b64([np.inf, 0], "<f4")["b64"]}})
    assert r.json()["skipped"] is True
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1e30, 1.0]})  # g² overflows float32
    assert r.json()["skipped"] is True
    assert await snapshot(client, sid) == before  # params and buffers untouched
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert meta["step"] == 1 and meta["skipped_steps"] == 3
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, 0.5]})
    assert r.json()["step"] == 2 and "skipped" not in r.json()


async def test_nan_policy_error_is_the_default(client):
    sid = await create(client)
    nan = np.full(8, np.nan).tobytes()
    r = await client.post(f"/v1/sessions/{sid}/step", content=nan, headers={"content-type": "application/octet-stream"})
    assert_problem(r, 422, "gradient 'w'", "non-finite")
    assert (await client.get(f"/v1/sessions/{sid}")).json()["skipped_steps"] == 0


async def test_scalar_tensors(client):
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 0.5}, "dtype": "float64",
                                                "params": {"w": [1.0, 2.0], "temperature": 3}})
    assert r.status_code == 201 and r.json()["params"]["temperature"] == 3.0
    assert r.json()["shapes"]["temperature"] == []
    sid = r.json()["id"]
    r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": [0.0, 0.0], "temperature": 1.0}})
    assert r.json()["params"]["temperature"] == 2.5


async def test_every_route_documents_an_example(client):
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]

    def has_example(content: dict) -> bool:
        for media in content.values():
            if "example" in media or "examples" in media:
                return True
            ref = media.get("schema", {}).get("$ref", "")
            if ref and "examples" in schemas[ref.rsplit("/", 1)[1]]:
                return True
            items = media.get("schema", {}).get("items", {}).get("$ref", "")
            if items and "examples" in schemas[items.rsplit("/", 1)[1]]:
                return True
        return False

    missing = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            documented = [r.get("content", {}) for r in op["responses"].values()]
            if "requestBody" in op:
                documented.append(op["requestBody"]["content"])
            if not any(has_example(c) for c in documented):
                missing.append(f"{method.upper()} {path}")
    assert missing == []
