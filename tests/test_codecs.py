"""Every wire format on every store: half-precision tensors widened to the session's float32 state
(JSON b64 with a dtype, octet-stream with Optim-Wire-Dtype), answers in the wire dtype asked for,
safetensors steps and checkpoints that safetensors itself reads, and the refusals of each."""

from __future__ import annotations

import base64

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

BF16 = np.dtype(ml_dtypes.bfloat16)
ST = "application/vnd.safetensors"
OCTET = "application/octet-stream"


def b64(array: np.ndarray, dtype: str | None = None) -> dict:
    doc = {"shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}
    return {**doc, "dtype": dtype} if dtype else doc


def from_b64(doc: dict, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(doc["b64"]), dtype).reshape(doc["shape"])


def torch_adam(params: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    p = torch.tensor(params, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
async def test_half_precision_travels_and_float32_state_stays(client, wire):
    rng = np.random.default_rng(0)
    dtype = BF16 if wire == "bfloat16" else np.dtype("<f2")
    start = rng.standard_normal(64).astype(dtype)
    created = await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.01}, "dtype": "float32",
                                                      "params": {"w": b64(start, wire)}})
    assert created.status_code == 201 and created.json()["dtype"] == "float32"
    assert created.json()["params"]["w"]["dtype"] == wire  # mirrored as it came
    sid = created.json()["id"]
    grads = [rng.standard_normal(64).astype(dtype) for _ in range(6)]
    for g in grads[:3]:  # JSON: b64 with a dtype
        answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": b64(g, wire)}})
        assert answer.status_code == 200
    for g in grads[3:]:  # octet-stream: half the bytes, the header says which
        answer = await client.post(f"/v1/sessions/{sid}/step", content=g.tobytes(),
                                   headers={"Content-Type": OCTET, "Accept": OCTET, "Optim-Wire-Dtype": wire})
        assert answer.status_code == 200 and answer.headers["optim-wire-dtype"] == wire
        assert len(answer.content) == 64 * 2
    master = torch_adam(start.astype(np.float32), [g.astype(np.float32) for g in grads])
    exact = await client.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"})
    np.testing.assert_allclose(from_b64(exact.json()["params"]["w"], "<f4"), master, rtol=1e-5, atol=1e-7)
    # the answer is the float32 master copy rounded to the wire dtype, as torch's .to() rounds
    narrowed = np.frombuffer(answer.content, dtype)
    expected = torch.tensor(from_b64(exact.json()["params"]["w"], "<f4")).to(
        torch.bfloat16 if wire == "bfloat16" else torch.float16).float().numpy()
    np.testing.assert_array_equal(narrowed.astype(np.float32), expected)
    wide = await client.get(f"/v1/sessions/{sid}/params", headers={"Accept": f"{OCTET}; dtype=float32"})
    assert "optim-wire-dtype" not in wide.headers or wide.headers["optim-wire-dtype"] == "float32"
    assert np.frombuffer(wide.content, "<f4").tobytes() == from_b64(exact.json()["params"]["w"], "<f4").tobytes()


async def test_safetensors_steps_and_answers(client):
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 0.5},
                                                   "params": {"w": w.tolist(), "b": b.tolist()}})).json()["id"]
    gw, gb = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(2).astype(BF16)
    body = safetensors.numpy.save({"w": gw, "b": gb})
    answer = await client.post(f"/v1/sessions/{sid}/step", content=body,
                               headers={"Content-Type": ST, "Accept": ST})
    assert answer.status_code == 200 and answer.headers["content-type"] == ST
    params = safetensors.numpy.load(answer.content)
    np.testing.assert_array_equal(params["w"], w - np.float32(0.5) * gw)
    np.testing.assert_array_equal(params["b"], b - np.float32(0.5) * gb.astype(np.float32))
    assert answer.headers["etag"] == '"1"'
    half = await client.get(f"/v1/sessions/{sid}/params", headers={"Accept": f"{ST}; dtype=bfloat16"})
    assert half.headers["optim-wire-dtype"] == "bfloat16"
    entries = dict(safetensors.deserialize(half.content))  # numpy has no bfloat16: the format's own reader
    assert entries["w"]["dtype"] == "BF16" and entries["w"]["shape"] == [3, 4]
    np.testing.assert_array_equal(np.frombuffer(entries["w"]["data"], BF16).reshape(3, 4),
                                  params["w"].astype(BF16))


async def test_a_safetensors_checkpoint_resumes_bit_exactly(client):
    rng = np.random.default_rng(2)
    body = {"optimizer": {"type": "adam", "lr": 0.05, "amsgrad": True}, "dtype": "float64",
            "params": {"w": rng.standard_normal((2, 3)).tolist(), "b": rng.standard_normal(3).tolist()}}
    sid = (await client.post("/v1/sessions", json=body)).json()["id"]
    for t in range(4):
        grads = {"w": rng.standard_normal((2, 3)).tolist(), "b": None if t == 1 else rng.standard_normal(3).tolist()}
        assert (await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads})).status_code == 200
    file = await client.get(f"/v1/sessions/{sid}/state", headers={"Accept": ST})
    assert file.status_code == 200 and file.headers["content-type"] == ST
    tensors = safetensors.numpy.load(file.content)  # any safetensors reader opens it
    assert set(tensors) == {"params/w", "params/b", "state/w/exp_avg", "state/w/exp_avg_sq", "state/w/max_exp_avg_sq",
                            "state/b/exp_avg", "state/b/exp_avg_sq", "state/b/max_exp_avg_sq"}
    resumed = await client.post("/v1/sessions", content=file.content, headers={"Content-Type": ST})
    assert resumed.status_code == 201, resumed.text
    copy = resumed.json()["id"]
    original, restored = [(await client.get(f"/v1/sessions/{s}/state")).json() for s in (sid, copy)]
    assert restored == original and original["state"]["tensor_steps"] == {"w": 4, "b": 3}
    grads = {"w": rng.standard_normal((2, 3)).tolist(), "b": rng.standard_normal(3).tolist()}
    one, two = [(await client.post(f"/v1/sessions/{s}/step", json={"gradients": grads})).json() for s in (sid, copy)]
    assert one["params"] == two["params"] and one["step"] == two["step"] == 5


async def test_what_no_codec_can_read_is_refused_and_changes_nothing(client):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": {"w": [1.0, 2.0]}})).json()["id"]
    before = (await client.get(f"/v1/sessions/{sid}/state")).json()
    step = f"/v1/sessions/{sid}/step"
    cases = [
        (dict(content=np.ones(2, np.float16).tobytes(), headers={"Content-Type": OCTET, "Optim-Wire-Dtype": "int8"}),
         422, "Optim-Wire-Dtype"),
        (dict(content=np.ones(2, np.float16).tobytes(), headers={"Content-Type": OCTET}), 422, "expected 8 bytes"),
        (dict(content=np.ones(3, np.float16).tobytes(), headers={"Content-Type": OCTET, "Optim-Wire-Dtype": "float16"}),
         422, "expected 4 bytes"),
        (dict(json={"gradients": {"w": [1.0, 1.0]}}, headers={"Accept": "application/json; dtype=int4"}), 406, "dtype"),
        (dict(json={"gradients": {"w": {**b64(np.ones(2, np.float16)), "dtype": "float8"}}}), 422, "float8"),
        (dict(json={"gradients": {"w": b64(np.ones(2, np.float16), "float32")}}), 422, "needs 8 bytes of float32"),
        (dict(content=b"\x08\x00\x00\x00\x00\x00\x00\x00{nonsense", headers={"Content-Type": ST}), 422, "safetensors"),
        (dict(content=safetensors.numpy.save({"v": np.ones(2, np.float32)}), headers={"Content-Type": ST}), 422,
         "unknown ['v']"),
        (dict(content=safetensors.numpy.save({"w": np.ones(3, np.float32)}), headers={"Content-Type": ST}), 422,
         "expected shape [2]"),
        (dict(content=safetensors.numpy.save({"w": np.ones(2, np.int32)}), headers={"Content-Type": ST}), 422, "I32"),
    ]
    for kwargs, status, words in cases:
        answer = await client.post(step, **kwargs)
        assert answer.status_code == status and words in answer.json()["detail"], (kwargs, answer.text)
    refused = await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "dtype": "bfloat16", "params": [1.0]})
    assert refused.status_code == 422 and "Optim-Wire-Dtype: bfloat16" in refused.json()["detail"]
    for bad in (b"", b"\xff" * 8 + b"{}", safetensors.numpy.save({"params/w": np.ones(2)})):
        refused = await client.post("/v1/sessions", content=bad, headers={"Content-Type": ST})
        assert refused.status_code == 422 and "checkpoint" in refused.json()["detail"]
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == before


def test_the_sdk_and_remote_optimizer_train_half_precision_models_over_float32_state(server):
    """A bfloat16 model: gradients and weights travel as bfloat16, the server keeps float32 master
    weights and Adam state (the mixed-precision recipe), and the model gets the master rounded."""
    from optim_client import OptimClient
    from optim_client.torch import RemoteOptimizer

    with OptimClient(server.url) as client:
        session = client.create_session({"w": np.ones(1000, BF16)}, optimizer="sgd", lr=0.5)
        assert session.metadata["dtype"] == "float32"
        out = session.step({"w": np.full(1000, 0.3, BF16)})["w"]
        assert out.dtype == BF16
        exact = np.float32(1) - np.float32(0.5) * np.float32(BF16.type(0.3))  # the float32 master
        assert np.all(out == BF16.type(exact))
        session.delete()

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    master = torch.nn.Linear(8, 4)
    master.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    local = torch.optim.Adam(master.parameters(), lr=0.01)
    x = torch.randn(16, 8)
    with RemoteOptimizer(model.named_parameters(), server.url, optimizer="adam", lr=0.01) as opt:
        for _ in range(5):
            opt.zero_grad()
            model(x.to(torch.bfloat16)).float().square().mean().backward()
            for m, p in zip(master.parameters(), model.parameters()):
                m.grad = p.grad.float()
            local.step()
            opt.step()
            with torch.no_grad():
                for m, p in zip(master.parameters(), model.parameters()):
                    assert p.dtype == torch.bfloat16
                    torch.testing.assert_close(p.float(), m.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
                    master_param = m
        assert opt.session.metadata["dtype"] == "float32"
        state = opt.state_dict()["state"][0]
        assert state["exp_avg"].dtype == torch.float32 and int(state["step"]) == 5
        del master_param
