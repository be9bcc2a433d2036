"""Training together, in-process on every store: synchronous rounds equal torch's step on the mean
(or weighted mean) of their contributions for every optimizer; the field's server-optimizer recipes
(DiLoCo's outer step, FedAvgM) equal torch on averaged pseudo-gradients; yogi equals its formula;
asynchronous pushes are scaled and bounded by staleness; timeouts, refusals and retries."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

K = 3
TYPES = [
    ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("adam", torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


async def create(client, optimizer: dict, params, aggregation: dict) -> str:
    answer = await client.post("/v1/sessions", json={"optimizer": optimizer, "dtype": "float64",
                                                     "params": params, "aggregation": aggregation})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


async def contribute(client, sid: str, grads, worker: str, **fields):
    return await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads, "worker": worker, **fields})


@pytest.mark.parametrize("weighting", ["mean", "weighted"])
@pytest.mark.parametrize("kind,cls,hp", TYPES, ids=[t[0] for t in TYPES])
async def test_a_round_is_one_torch_step_on_the_mean_of_its_contributions(client, kind, cls, hp, weighting):
    rng = np.random.default_rng(4)
    start = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    sid = await create(client, {"type": kind, **hp}, {k: v.tolist() for k, v in start.items()},
                       {"mode": "sync", "contributions": K, "weighting": weighting})
    local = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    opt = cls(list(local.values()), **hp)
    for r in range(4):
        grads = [{k: rng.standard_normal(v.shape) for k, v in start.items()} for _ in range(K)]
        weights = [float(w) for w in rng.integers(1, 50, K)] if weighting == "weighted" else [1.0] * K
        for i, (g, w) in enumerate(zip(grads, weights)):
            answer = await contribute(client, sid, {k: v.tolist() for k, v in g.items()}, f"w{i}", weight=w, round=r)
            assert answer.status_code == (202 if i < K - 1 else 200), answer.text
        assert answer.json()["step"] == r + 1 and answer.json()["round"] == r
        for name, param in local.items():  # the mean as the round sums it: in order, then divided
            total = grads[0][name] * weights[0]
            for g, w in zip(grads[1:], weights[1:]):
                total = total + g[name] * w
            param.grad = torch.tensor(total / sum(weights))
        opt.step()
    for name, param in local.items():
        np.testing.assert_allclose(answer.json()["params"][name], param.detach().numpy(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("recipe,hp", [("diloco", {"lr": 0.7, "momentum": 0.9, "nesterov": True}),
                                       ("fedavgm", {"lr": 1.0, "momentum": 0.9})])
async def test_outer_steps_on_averaged_pseudo_gradients(client, recipe, hp):
    """DiLoCo's outer step (SGD lr 0.7, momentum 0.9, Nesterov) and FedAvgM (SGD lr 1, momentum μ):
    each worker trains from the global weights and sends old − new; the round steps on their mean."""
    rng = np.random.default_rng(5)
    weights = rng.standard_normal(8)
    sid = await create(client, {"type": "sgd", **hp}, weights.tolist(), {"mode": "sync", "contributions": 4})
    outer = torch.tensor(weights, requires_grad=True)
    opt = torch.optim.SGD([outer], **hp)
    for r in range(10):
        deltas = []
        for i in range(4):  # an inner run: a few local SGD steps on a worker's own quadratic
            local = weights.copy()
            target = rng.standard_normal(8)
            for _ in range(3):
                local -= 0.1 * (local - target)
            deltas.append(weights - local)  # the pseudo-gradient
            answer = await contribute(client, sid, deltas[-1].tolist(), f"worker-{i}")
        weights = np.array(answer.json()["params"])
        outer.grad = torch.tensor(((deltas[0] + deltas[1]) + deltas[2] + deltas[3]) / 4)
        opt.step()
        np.testing.assert_allclose(weights, outer.detach().numpy(), rtol=1e-7, atol=1e-12)


async def test_yogi_equals_its_formula(client):
    rng = np.random.default_rng(6)
    theta = rng.standard_normal(5)
    sid = await create(client, {"type": "yogi", "lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-3}, theta.tolist(),
                       {"mode": "each"})
    m, v = np.zeros(5), np.full(5, 1e-6)
    for t in range(1, 21):
        g = rng.standard_normal(5) * (10 if t % 7 == 0 else 1)
        m = 0.8 * m + 0.2 * g
        v = v - 0.01 * g * g * np.sign(v - g * g)
        theta = theta - 0.05 / (1 - 0.8**t) * m / (np.sqrt(v) / math.sqrt(1 - 0.99**t) + 1e-3)
        answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": g.tolist()})
    np.testing.assert_allclose(answer.json()["params"], theta, rtol=1e-7)


@pytest.mark.parametrize("scale,expected", [
    ({"type": "constant"}, lambda tau: 1.0),
    ({"type": "inverse"}, lambda tau: 1 / (1 + tau)),
    ({"type": "polynomial", "a": 0.7}, lambda tau: (1 + tau) ** -0.7),
    ({"type": "hinge", "a": 2.0, "b": 1.0}, lambda tau: 1.0 if tau <= 1 else 1 / (2.0 * (tau - 1) + 1)),
])
async def test_async_pushes_are_scaled_by_their_staleness(client, scale, expected):
    sid = await create(client, {"type": "sgd", "lr": 0.5}, [0.0], {"mode": "async", "max_staleness": 3,
                                                                    "staleness_scale": scale})
    theta, bases = 0.0, [0, 0, 1, 0, 4, 2]
    for step, base in enumerate(bases):
        answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1.0], "base_step": base})
        tau = step - base
        assert answer.status_code == 200 and answer.json()["staleness"] == tau
        assert answer.json()["lr_scale"] == pytest.approx(expected(tau), rel=1e-12)
        theta -= 0.5 * expected(tau)
        assert answer.json()["params"][0] == pytest.approx(theta, rel=1e-12)
    before = (await client.get(f"/v1/sessions/{sid}/state")).json()
    stale = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1.0], "base_step": 2})
    assert stale.status_code == 409 and stale.json()["step"] == 6 and "at most 3 steps stale" in stale.json()["detail"]
    ahead = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1.0], "base_step": 9})
    assert ahead.status_code == 422
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == before


async def test_refused_contributions_change_nothing(client):
    sid = await create(client, {"type": "sgd", "lr": 1.0}, [0.0, 0.0], {"mode": "sync", "contributions": 3})
    assert (await contribute(client, sid, [1.0, 1.0], "a")).status_code == 202
    before = (await client.get(f"/v1/sessions/{sid}/state")).json(), (await client.get(f"/v1/sessions/{sid}/round")).json()
    cases = [
        (dict(json={"gradients": [1.0, 1.0], "worker": "a"}), 409, "already"),
        (dict(json={"gradients": [1.0, 1.0], "worker": "b", "round": 3}), 409, "round 3 is not open"),
        (dict(json={"gradients": [1.0, 1.0]}), 422, '"worker"'),
        (dict(content=b'{"gradients": [1.0, NaN], "worker": "b"}', headers={"Content-Type": "application/json"}),
         422, None),
        (dict(content=b'{"gradients": [1.0, 1e309], "worker": "b"}', headers={"Content-Type": "application/json"}),
         422, None),
        (dict(json={"gradients": [1.0, 1.0], "worker": "b", "weight": 0}), 422, "weight"),
        (dict(content=np.ones(2).tobytes(), headers={"Content-Type": "application/octet-stream", "Optim-Weight": "-1",
                                                      "Optim-Worker": "b"}), 422, "Optim-Weight"),
        (dict(content=np.ones(2).tobytes(), headers={"Content-Type": "application/octet-stream", "Optim-Worker": "a"}),
         409, "already"),
    ]
    for kwargs, status, words in cases:
        answer = await client.post(f"/v1/sessions/{sid}/step", **kwargs)
        assert answer.status_code == status, (kwargs, answer.text)
        assert words is None or words in answer.json()["detail"]
    after = (await client.get(f"/v1/sessions/{sid}/state")).json(), (await client.get(f"/v1/sessions/{sid}/round")).json()
    assert after == before and after[1]["workers"] == ["a"]
    # headers carry a binary contribution's worker and round
    ok = await client.post(f"/v1/sessions/{sid}/step", content=np.full(2, 2.0).tobytes(), headers={
        "Content-Type": "application/octet-stream", "Optim-Worker": "b", "Optim-Round": "0"})
    assert ok.status_code == 202 and ok.json()["received"] == 2


async def test_a_retry_under_one_key_is_counted_once(client):
    sid = await create(client, {"type": "sgd", "lr": 1.0}, [0.0], {"mode": "sync", "contributions": 2})
    key = {"Idempotency-Key": "contribution-a"}
    first = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [2.0], "worker": "a"}, headers=key)
    again = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [2.0], "worker": "a"}, headers=key)
    assert first.status_code == again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["received"] == 1
    other = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [3.0], "worker": "a"}, headers=key)
    assert other.status_code == 422  # the same key for another body
    done = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [4.0], "worker": "b"},
                             headers={"Idempotency-Key": "contribution-b"})
    assert done.status_code == 200 and done.json()["params"] == [-3.0]
    late = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [2.0], "worker": "a"}, headers=key)
    assert late.status_code == 200 and late.json()["params"] == [-3.0] and late.headers["idempotent-replayed"] == "true"
    replay = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [4.0], "worker": "b"},
                               headers={"Idempotency-Key": "contribution-b"})
    assert replay.status_code == 200 and replay.json()["step"] == 1


async def test_a_round_commits_at_its_timeout_with_its_minimum_and_never_fewer(client):
    sid = await create(client, {"type": "sgd", "lr": 1.0}, [0.0], {
        "mode": "sync", "contributions": 4, "min_contributions": 2, "round_timeout_seconds": 0.3})
    assert (await contribute(client, sid, [1.0], "a")).status_code == 202
    await asyncio.sleep(0.5)
    status = (await client.get(f"/v1/sessions/{sid}/round")).json()
    assert status["round"] == 0 and status["received"] == 1  # past its deadline, one short of M: open
    late = await contribute(client, sid, [3.0], "b")  # the second, after the deadline: commits at once
    assert late.status_code == 200 and late.json()["params"] == [-2.0] and late.json()["round"] == 0
    for worker, g in (("a", 1.0), ("b", 5.0)):
        assert (await contribute(client, sid, [g], worker)).status_code == 202
    await asyncio.sleep(0.6)  # nobody asks: the server's own timer commits it
    status = (await client.get(f"/v1/sessions/{sid}/round")).json()
    assert status["round"] == 2 and status["received"] == 0
    assert (await client.get(f"/v1/sessions/{sid}/params")).json()["params"] == [-5.0]


async def test_a_contributor_may_wait_for_its_round(client):
    sid = await create(client, {"type": "sgd", "lr": 1.0}, [0.0], {"mode": "sync", "contributions": 2})

    async def waiting():
        return await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1.0], "worker": "a"},
                                 headers={"Prefer": "wait=10"})

    async def completing():
        await asyncio.sleep(0.2)
        return await contribute(client, sid, [3.0], "b")

    first, second = await asyncio.gather(waiting(), completing())
    assert first.status_code == second.status_code == 200
    assert first.json()["params"] == second.json()["params"] == [-2.0] and first.json()["step"] == 1
    quick = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [1.0], "worker": "a"},
                              headers={"Prefer": "wait=0.2"})
    assert quick.status_code == 202  # still open when the wait ran out
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert meta["aggregation"]["mode"] == "sync" and meta["step"] == 1


# --- the SDKs, against a real server -----------------------------------------------------------------

def test_the_python_sdk_contributes_and_pushes(server):
    from optim_client import OptimClient

    with OptimClient(server.url) as client:
        session = client.create_session(np.zeros(100), "sgd", lr=1.0,
                                        aggregation={"mode": "sync", "contributions": 2, "weighting": "weighted"})
        assert session.contribute(np.ones(100), "a", weight=1.0) is None  # binary: Optim-* headers
        assert session.last_round["received"] == 1 and session.round()["workers"] == ["a"]
        other = client.get_session(session.id)
        params = other.contribute(np.full(100, 4.0), "b", weight=3.0, round=0)
        np.testing.assert_array_equal(params, np.full(100, -3.25))  # (1 + 12) / 4
        assert other.step_count == 1 and other.last_round is None

        pushed = client.create_session(np.zeros(2), "sgd", lr=1.0,
                                       aggregation={"mode": "async", "max_staleness": 1,
                                                    "staleness_scale": {"type": "inverse"}})
        behind = client.get_session(pushed.id)
        pushed.step(np.ones(2))
        np.testing.assert_array_equal(behind.step(np.ones(2)), [-1.5, -1.5])  # its params were step 0's
        from optim_client.errors import ConflictError

        with pytest.raises(ConflictError, match="steps stale"):
            behind.step(np.ones(2), base_step=0)


async def test_the_async_sdk_waits_for_a_round(server):
    from optim_client import AsyncOptimClient

    async with AsyncOptimClient(server.url) as client:
        session = await client.create_session({"w": np.zeros(3)}, "sgd", lr=1.0,
                                              aggregation={"mode": "sync", "contributions": 2})
        other = await client.get_session(session.id)
        waiting = asyncio.create_task(session.contribute({"w": np.ones(3)}, "a", wait=10))
        await asyncio.sleep(0.2)
        done = await other.contribute({"w": np.full(3, 3.0)}, "b")
        assert (await waiting)["w"].tolist() == done["w"].tolist() == [-2.0, -2.0, -2.0]


def test_four_worker_processes_train_one_model_as_torch_on_the_mean(server):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "train_together.py"
    result = subprocess.run([sys.executable, str(example), server.url], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("match")
