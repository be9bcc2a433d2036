"""A named tensor whose gradient is null skips the step, as torch skips a parameter whose .grad is
None: its values stay, and its own step count (torch's per-parameter state["step"]) with them. On
every store, through checkpoints, and equal to torch."""

from __future__ import annotations

import numpy as np
import torch


async def test_a_null_gradient_skips_its_tensor_as_torch_does(client):
    rng = np.random.default_rng(3)
    a0, b0 = rng.standard_normal(4), rng.standard_normal(2)
    a, b = (torch.tensor(v, requires_grad=True) for v in (a0, b0))
    local = torch.optim.Adam([a, b], lr=0.1, amsgrad=True)
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.1, "amsgrad": True},
                                                   "dtype": "float64", "params": {"a": a0.tolist(), "b": b0.tolist()}})).json()["id"]
    for t in range(9):
        ga, gb = rng.standard_normal(4), rng.standard_normal(2)
        frozen = t % 3 == 0
        a.grad, b.grad = torch.tensor(ga), None if frozen else torch.tensor(gb)
        local.step()
        answer = await client.post(f"/v1/sessions/{sid}/step",
                                   json={"gradients": {"a": ga.tolist(), "b": None if frozen else gb.tolist()}})
        assert answer.status_code == 200, answer.text
    params = answer.json()["params"]
    np.testing.assert_allclose(params["a"], a.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(params["b"], b.detach().numpy(), rtol=1e-12)
    checkpoint = (await client.get(f"/v1/sessions/{sid}/state")).json()
    assert checkpoint["state"]["step"] == 9 and checkpoint["state"]["tensor_steps"] == {"a": 9, "b": 6}

    # the checkpoint resumes with each tensor's own count: the next steps still equal torch's
    copy = (await client.post("/v1/sessions", json=checkpoint)).json()["id"]
    for _ in range(3):
        ga, gb = rng.standard_normal(4), rng.standard_normal(2)
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        local.step()
        answer = await client.post(f"/v1/sessions/{copy}/step", json={"gradients": {"a": ga.tolist(), "b": gb.tolist()}})
    np.testing.assert_allclose(answer.json()["params"]["b"], b.detach().numpy(), rtol=1e-12)
    assert "tensor_steps" in (await client.get(f"/v1/sessions/{copy}/state")).json()["state"]


async def test_what_cannot_be_skipped_is_refused_and_changes_nothing(client):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": {"a": [1.0], "b": [2.0]}})).json()["id"]
    before = (await client.get(f"/v1/sessions/{sid}/state")).json()
    refused = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"a": None, "b": None}})
    assert refused.status_code == 422 and "nothing to step" in refused.json()["detail"]
    one = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})).json()["id"]
    refused = await client.post(f"/v1/sessions/{one}/step", json={"gradients": None})
    assert refused.status_code == 422
    bad = {**before, "state": {**before["state"], "tensor_steps": {"a": 3, "b": 0}}}
    refused = await client.post("/v1/sessions", json=bad)
    assert refused.status_code == 422 and "more updates than the session's step 0" in refused.json()["detail"]
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == before
