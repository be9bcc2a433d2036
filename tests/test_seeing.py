"""Seeing training, on every store: the history each step writes (bounded, JSON and CSV, the lr each
step used), and a diagnosis that names the truths of quadratics where they are known — lr > 2/L
diverges, 1/L < lr < 2/L zig-zags (while the loss still falls), lr ≪ 1/L crawls — and of a small
real model."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest


async def quadratic(client, lr: float, steps: int, curvature: float = 1.0, momentum: float = 0.0) -> str:
    """Plain gradient descent on f(θ) = ½·L·|θ|², sending the loss with each step."""
    theta = np.array([1.0, -0.5, 0.25])
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd", "lr": lr, "momentum": momentum},
                                                   "dtype": "float64", "params": theta.tolist()})).json()["id"]
    for _ in range(steps):
        loss = 0.5 * curvature * float(theta @ theta)
        answer = await client.post(f"/v1/sessions/{sid}/step",
                                   json={"gradients": (curvature * theta).tolist(), "loss": loss})
        assert answer.status_code == 200, answer.text
        theta = np.array(answer.json()["params"])
    return sid


async def verdict(client, sid: str) -> dict:
    answer = await client.get(f"/v1/sessions/{sid}/diagnosis")
    assert answer.status_code == 200
    return answer.json()


@pytest.mark.parametrize("lr,steps,expected", [
    (2.5, 30, "diverging"),  # > 2/L
    (1.8, 30, "oscillating"),  # between 1/L and 2/L: θ flips sign every step, the loss still falls
    (1e-6, 60, "too_slow"),  # far below 1/L
    (0.3, 30, "healthy"),
    (0.3, 5, "not_enough_data"),
])
async def test_the_diagnosis_names_a_quadratics_truth(client, lr, steps, expected):
    sid = await quadratic(client, lr, steps)
    found = await verdict(client, sid)
    assert found["verdict"] == expected, found
    assert found["suggestion"] and isinstance(found["evidence"], dict)


async def test_a_plateau_is_no_improvement_for_patience_steps(client):
    rng = np.random.default_rng(0)
    theta = np.zeros(4)
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 0.1}, "dtype": "float64",
                                                   "params": (theta + 1).tolist()})).json()["id"]
    for t in range(40):  # at the noise floor: the gradient is noise, the loss wanders around 1
        loss = 1.0 + (0.2 if t == 0 else 0.0) + 1e-6 * rng.standard_normal()  # under the 1e-4 threshold
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": rng.standard_normal(4).tolist(), "loss": loss})
    found = await verdict(client, sid)
    assert found["verdict"] == "plateau" and found["evidence"]["steps_without_improvement"] >= 20


async def test_a_small_real_model(client):
    """Linear regression on features of different scales: a good lr is healthy, a tiny one crawls."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3)) * np.array([1.0, 3.0, 0.5])
    y = x @ np.array([2.0, -1.0, 0.5]) + 0.1

    async def train(lr: float) -> str:
        w = np.zeros(4)
        sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": lr}, "dtype": "float64",
                                                       "params": w.tolist()})).json()["id"]
        for _ in range(40):
            residual = x @ w[:3] + w[3] - y
            grad = np.append(x.T @ residual, residual.sum()) / len(y)
            w = np.array((await client.post(f"/v1/sessions/{sid}/step", json={
                "gradients": grad.tolist(), "loss": float(np.mean(residual**2) / 2)})).json()["params"])
        return sid

    assert (await verdict(client, await train(0.1)))["verdict"] == "healthy"
    assert (await verdict(client, await train(1e-7)))["verdict"] == "too_slow"


@pytest.mark.parametrize("params,body", [
    ({"w": [1.0, 2.0, 3.0]}, "json"),  # one run: the norm comes from the line's own pass
    ({"w": [1.0, 2.0], "b": [0.5]}, "json"),  # in pieces: taken apart, before the update
    ({"w": [1.0, 2.0], "b": [0.5]}, "binary"),  # read into the working copy: taken before the update overwrites it
])
async def test_the_history_norm_is_the_gradients_l2_norm_on_every_path(client, params, body):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.1}, "dtype": "float64",
                                                   "params": params})).json()["id"]
    grads = {n: [0.3 * (i + 1) * (-1) ** i for i in range(len(v))] for n, v in params.items()}
    if body == "json":
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads})
    else:
        raw = np.concatenate([np.asarray(g, "<f8") for g in grads.values()]).tobytes()
        await client.post(f"/v1/sessions/{sid}/step", content=raw, headers={"Content-Type": "application/octet-stream"})
    line = (await client.get(f"/v1/sessions/{sid}/history")).json()["history"][-1]
    expected = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    assert line["grad_norm"] == pytest.approx(expected, rel=1e-12) and line["clipped"] is False
    assert line["worker"] is None and set(line["ratio"]) == set(params) and len(line["u"]) == 16


async def test_a_history_line_keeps_its_worker_loss_and_every_group_lr(client):
    sid = (await client.post("/v1/sessions", json={
        "optimizer": {"type": "sgd", "lr": 0.1}, "dtype": "float32", "params": {"w": [1.0, 2.0], "b": [0.5]},
        "param_groups": [{"params": ["b"], "lr": 0.25}]})).json()["id"]
    for worker in ("trainer-1", "trainer-2"):
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": [0.5, 0.5], "b": [1.0]}, "loss": 2.5},
                          headers={"Optim-Worker": worker})
    first, second = (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]
    assert (first["worker"], second["worker"]) == ("trainer-1", "trainer-2")
    assert first["loss"] == 2.5 and first["lr"] == [0.1, 0.25] and first["skipped"] is False
    # each tensor moved lr·|g| per element: the ratio is that over its RMS
    assert first["ratio"]["w"] == pytest.approx(0.05 * np.sqrt(2) / np.sqrt(5), rel=1e-6)
    assert first["ratio"]["b"] == pytest.approx(0.25 / 0.5, rel=1e-6)


async def test_history_records_each_step_and_reads_as_csv(client):
    sid = (await client.post("/v1/sessions", json={
        "optimizer": {"type": "sgd", "lr": 0.1}, "dtype": "float64", "params": {"w": [1.0, 2.0], "b": [0.5]},
        "schedule": {"type": "inverse_sqrt"}, "clip_grad_norm": {"max_norm": 1.0},
        "param_groups": [{"params": ["b"], "lr": 0.5}]})).json()["id"]
    for t in range(12):
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": [0.1, 0.2], "b": [3.0 if t % 2 else 0.1]},
                                                            "loss": 1.0 / (t + 1)})
    steps = (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]
    assert [s["step"] for s in steps] == list(range(1, 13))
    third = steps[2]
    assert third["lr"] == pytest.approx([0.1 / np.sqrt(3), 0.5 / np.sqrt(3)], rel=1e-12)  # what step 3 used
    assert steps[1]["grad_norm"] == pytest.approx(np.sqrt(0.01 + 0.04 + 9.0), rel=1e-12) and steps[1]["clipped"]
    assert third["grad_norm"] == pytest.approx(np.sqrt(0.01 + 0.04 + 0.01), rel=1e-12) and not third["clipped"]
    assert set(third["ratio"]) == {"w", "b"} and len(third["u"]) == 16
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert meta["next_lr"] == pytest.approx([0.1 / np.sqrt(13), 0.5 / np.sqrt(13)], rel=1e-12)  # the next step's
    table = list(csv.DictReader(io.StringIO((await client.get(
        f"/v1/sessions/{sid}/history", params={"since": 4, "every": 2}, headers={"Accept": "text/csv"})).text)))
    assert [int(r["step"]) for r in table] == [4, 6, 8, 10, 12]
    assert float(table[0]["loss"]) == 0.25 and table[0]["clipped"] == "True" and "ratio:b" in table[0]  # t = 3: b 3.0
    assert (await client.get(f"/v1/sessions/{sid}/history", headers={"Accept": "image/png"})).status_code == 406


async def test_history_is_bounded(app, client):
    app.state.settings.history_steps = 20  # the setting, read by each step
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})).json()["id"]
    for _ in range(60):
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.1]})
    steps = [s["step"] for s in (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]]
    assert steps == [10, 20, 30, 40, *range(41, 61)]  # the last 20 whole, every 10th before


async def test_fork_is_bit_identical_and_takes_overrides(client):
    rng = np.random.default_rng(2)
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.01}, "dtype": "float32",
                                                   "params": {"w": rng.standard_normal(50).tolist()}})).json()["id"]
    for _ in range(3):
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": rng.standard_normal(50).tolist()}})
    original = (await client.get(f"/v1/sessions/{sid}/state")).json()
    forks = []
    for lr in (0.001, 0.01, 0.1):
        answer = await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"lr": lr}})
        assert answer.status_code == 201 and answer.json()["step"] == 3 and answer.json()["optimizer"]["lr"] == lr
        forks.append(answer.json()["id"])
        state = (await client.get(f"/v1/sessions/{forks[-1]}/state")).json()
        assert state["params"] == original["params"] and state["state"] == original["state"]  # the same bytes
    grads = {"w": rng.standard_normal(50).tolist()}
    same = await client.post(f"/v1/sessions/{forks[1]}/step", json={"gradients": grads})
    mine = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads})
    assert same.json() == mine.json()  # the same lr from the same point: the same step
    key = {"Idempotency-Key": "fork-once"}
    first = await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"lr": 0.5}}, headers=key)
    retry = await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"lr": 0.5}}, headers=key)
    assert first.status_code == retry.status_code == 201 and retry.json()["id"] == first.json()["id"]
    assert retry.headers["idempotent-replayed"] == "true"  # a retried fork is the same fork, not another
    assert first.json()["forked_from"] == {"session": sid, "step": 4}
    other = await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"lr": 0.25}}, headers=key)
    assert other.status_code == 422 and first.json()["id"] in other.json()["detail"]  # the key, reused: no new fork
    assert len((await client.get("/v1/sessions")).json()["sessions"]) == 5  # the source, 3 forks and the keyed one
    refused = await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"amsgrad": True}})
    assert refused.status_code == 422 and "max_exp_avg_sq" in refused.json()["detail"]
    assert (await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"type": "sgd"}})).status_code == 422
    assert (await client.post(f"/v1/sessions/{sid}/fork", json={"optimizer": {"lr": -1}})).status_code == 422


async def test_a_dry_run_answers_the_step_and_changes_nothing(client):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.1}, "dtype": "float64",
                                                   "params": [1.0, 2.0]})).json()["id"]
    await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, 0.5], "loss": 1.0})
    before = (await client.get(f"/v1/sessions/{sid}/state")).json()
    steps_before = (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]
    key = {"Idempotency-Key": "dry-then-real"}
    dry = await client.post(f"/v1/sessions/{sid}/step?dry_run=true", json={"gradients": [0.3, -0.2]}, headers=key)
    assert dry.status_code == 200 and dry.headers["optim-dry-run"] == "true" and dry.json()["step"] == 2
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == before
    assert (await client.get(f"/v1/sessions/{sid}/history")).json()["history"] == steps_before
    real = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.3, -0.2]}, headers=key)
    assert real.status_code == 200 and "idempotent-replayed" not in real.headers  # no claim was taken
    assert real.json()["params"] == dry.json()["params"]
    assert (await client.post(f"/v1/sessions/{sid}/step?dry_run=maybe", json={"gradients": [1.0, 1.0]})).status_code == 422


async def test_rollback_restores_a_kept_step_bit_exactly(client):
    rng = np.random.default_rng(9)
    sid = (await client.post("/v1/sessions", json={
        "optimizer": {"type": "adam", "lr": 0.05, "amsgrad": True}, "dtype": "float32", "rollback_snapshots": 3,
        "params": {"w": rng.standard_normal(20).tolist()}, "schedule": {"type": "reduce_on_plateau", "patience": 1}})).json()["id"]
    grads, states = [], {}
    for t in range(1, 7):
        grads.append({"w": rng.standard_normal(20).tolist()})
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads[-1], "loss": 1.0})
        states[t] = (await client.get(f"/v1/sessions/{sid}/state")).json()
    key = {"Idempotency-Key": "back-to-4"}
    back = await client.post(f"/v1/sessions/{sid}/rollback", json={"to_step": 4}, headers=key)
    assert back.status_code == 200 and back.json()["step"] == 4
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == states[4]  # params, buffers, schedule state
    again = await client.post(f"/v1/sessions/{sid}/rollback", json={"to_step": 4}, headers=key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    redo = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads[4], "loss": 1.0})
    assert redo.json()["step"] == 5 and (await client.get(f"/v1/sessions/{sid}/state")).json() == states[5]
    late = await client.post(f"/v1/sessions/{sid}/rollback", json={"to_step": 4}, headers=key)
    assert late.status_code == 409  # that rollback's answer is gone: the session moved on; it is not done twice
    gone = await client.post(f"/v1/sessions/{sid}/rollback", json={"to_step": 6})  # dropped by the rollback
    assert gone.status_code == 409 and "outside the kept window" in gone.json()["detail"]
    old = await client.post(f"/v1/sessions/{sid}/rollback", json={"to_step": 1})
    assert old.status_code == 409 and "steps 4 to 5" in old.json()["detail"]
    plain = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})).json()["id"]
    refused = await client.post(f"/v1/sessions/{plain}/rollback", json={"to_step": 0})
    assert refused.status_code == 409 and "rollback_snapshots" in refused.json()["detail"]


def test_server_sent_events_follow_the_steps(server):
    import json
    import threading

    import httpx

    sid = httpx.post(f"{server.url}/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]}).json()["id"]
    for _ in range(3):
        httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"gradients": [1.0], "loss": 0.5})
    events = []
    with httpx.stream("GET", f"{server.url}/v1/sessions/{sid}/events", params={"since": 1}, timeout=20) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:  # steps 2 and 3, kept before the stream began
                    threading.Timer(0.3, lambda: httpx.post(f"{server.url}/v1/sessions/{sid}/step",
                                                            json={"gradients": [1.0], "loss": 0.25})).start()
                if len(events) == 3:
                    break
    assert [e["step"] for e in events] == [2, 3, 4] and events[-1]["loss"] == 0.25
    assert httpx.get(f"{server.url}/v1/sessions/nope/events").status_code == 404


@pytest.mark.parametrize("cosine", [-0.9, -0.5, 0.5, 0.9])
def test_the_sketch_keeps_the_sign_of_the_cosine_between_updates(cosine):
    """The diagnosis reads a zig-zag from the sketches of consecutive updates: over random pairs of
    4,000 parameters, the cosine between two count sketches estimates the cosine between the updates
    (median within 0.1) and has its sign nearly always."""
    from optim_service import history

    rng = np.random.default_rng(7)
    start, estimates = np.zeros(4000), []
    for _ in range(200):
        u = rng.standard_normal(4000)
        noise = rng.standard_normal(4000)
        noise -= (noise @ u) / (u @ u) * u
        v = cosine * u / np.linalg.norm(u) + np.sqrt(1 - cosine**2) * noise / np.linalg.norm(noise)
        plan = history._plan((4000,))
        sums = [np.zeros(2 + history.SKETCH + 1) for _ in range(2)]
        for d, out in zip((u, v), sums):
            history._measure(start, d, d[:0], plan.stride, plan.samples, plan.starts, out)
        su, sv = (out[2:2 + history.SKETCH] for out in sums)
        estimates.append(su @ sv / np.linalg.norm(su) / np.linalg.norm(sv))
    assert np.median(estimates) == pytest.approx(cosine, abs=0.1)
    assert np.mean(np.sign(estimates) == np.sign(cosine)) > 0.9


def test_a_line_of_the_dense_sketch_reads_without_its_sketch():
    """Lines of version 1 held a dense ±1 projection, whose cosines mean nothing against count
    sketches: they read with their ratios but no ``u``."""
    from optim_service import history

    line = bytearray(history.entry(3, np.ones(4), np.full(4, 1.5), (4,), loss=0.5, lrs=[0.1], norm=None, clip=None,
                                   worker=None, skipped=False, grads=np.ones(4)))
    assert len(history.decode(bytes(line), ["w"])["u"]) == history.SKETCH
    line[0] = 1
    old = history.decode(bytes(line), ["w"])
    assert "u" not in old and old["ratio"]["w"] == pytest.approx(0.5) and old["grad_norm"] == pytest.approx(2.0)
