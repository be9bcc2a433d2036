"""The schedules that ramp, restart and chain equal torch.optim.lr_scheduler's, step by step over
120+ steps (float64, rtol 1e-7); OneCycleLR's momentum and beta1 too, through whole training runs;
the lr range test's curve and the lr the diagnosis suggests from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as ls

from optim_service.optim.config import TrainingConfig

STEPS = 130


def torch_lrs(make_scheduler, base_lr: float = 0.1, momentum: float = 0.9, steps: int = STEPS):
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr, momentum=momentum)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        scheduler.step()
    return out


CASES = [
    ({"type": "cosine_warm_restarts", "T_0": 10}, lambda o: ls.CosineAnnealingWarmRestarts(o, T_0=10)),
    ({"type": "cosine_warm_restarts", "T_0": 7, "T_mult": 2, "eta_min": 0.001},
     lambda o: ls.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=0.001)),
    ({"type": "onecycle", "max_lr": 0.5, "total_steps": STEPS}, lambda o: ls.OneCycleLR(o, max_lr=0.5, total_steps=STEPS)),
    ({"type": "onecycle", "max_lr": 0.5, "total_steps": STEPS, "anneal_strategy": "linear", "three_phase": True,
      "pct_start": 0.25, "div_factor": 10, "final_div_factor": 100},
     lambda o: ls.OneCycleLR(o, max_lr=0.5, total_steps=STEPS, anneal_strategy="linear", three_phase=True,
                             pct_start=0.25, div_factor=10, final_div_factor=100)),
    ({"type": "sequential", "milestones": [20], "schedules": [
        {"type": "linear", "start_factor": 0.1, "total_iters": 20}, {"type": "cosine", "T_max": 110}]},
     lambda o: ls.SequentialLR(o, [ls.LinearLR(o, start_factor=0.1, total_iters=20), ls.CosineAnnealingLR(o, T_max=110)],
                               milestones=[20])),
    ({"type": "sequential", "milestones": [30, 80], "schedules": [
        {"type": "exponential", "gamma": 0.97}, {"type": "step", "step_size": 10, "gamma": 0.5},
        {"type": "cosine_warm_restarts", "T_0": 15}]},
     lambda o: ls.SequentialLR(o, [ls.ExponentialLR(o, 0.97), ls.StepLR(o, 10, 0.5),
                                   ls.CosineAnnealingWarmRestarts(o, T_0=15)], milestones=[30, 80])),
]


@pytest.mark.parametrize("schedule,make", CASES, ids=[c[0]["type"] + str(i) for i, c in enumerate(CASES)])
def test_each_steps_learning_rate_equals_torch(schedule, make):
    config = TrainingConfig.model_validate({"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
                                            "schedule": schedule})
    expected = torch_lrs(make)
    for t, (lr, momentum) in enumerate(expected):
        got = config.schedule.overrides(config.optimizer, t)
        assert got["lr"] == pytest.approx(lr, rel=1e-7, abs=1e-15), (t, got, lr)
        if schedule["type"] == "onecycle":
            assert got["momentum"] == pytest.approx(momentum, rel=1e-7), t


@pytest.mark.parametrize("kind,cls,hp", [("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                                         ("adam", torch.optim.Adam, {"lr": 0.01})])
async def test_onecycle_trains_as_torch_with_its_momentum_cycled(client, kind, cls, hp):
    rng = np.random.default_rng(3)
    start = rng.standard_normal(6)
    schedule = {"type": "onecycle", "max_lr": 0.05, "total_steps": 120}
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": kind, **hp}, "dtype": "float64",
                                                   "params": start.tolist(), "schedule": schedule})).json()["id"]
    param = torch.tensor(start, requires_grad=True)
    opt = cls([param], **hp)
    scheduler = ls.OneCycleLR(opt, max_lr=0.05, total_steps=120)
    for _ in range(120):
        g = rng.standard_normal(6)
        param.grad = torch.tensor(g)
        opt.step()
        scheduler.step()
        answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": g.tolist()})
    np.testing.assert_allclose(answer.json()["params"], param.detach().numpy(), rtol=1e-7)
    over = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.0] * 6})
    assert over.status_code == 422 and "total_steps" in over.json()["detail"]  # torch raises past the end


async def test_onecycle_needs_something_to_cycle(client):
    for optimizer in ({"type": "adagrad"}, {"type": "sgd", "lr": 0.1}):
        refused = await client.post("/v1/sessions", json={"optimizer": optimizer, "params": [1.0],
                                                          "schedule": {"type": "onecycle", "max_lr": 1, "total_steps": 9}})
        assert refused.status_code == 422 and "momentum" in refused.json()["detail"]
    assert (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0], "schedule": {
        "type": "onecycle", "max_lr": 1, "total_steps": 9, "cycle_momentum": False}})).status_code == 201


async def test_the_lr_range_test_and_the_lr_it_suggests(client):
    """f(θ) = ½·|θ|² (L = 1): plain GD descends for lr < 2 and diverges above; the suggestion lies in
    the descending range, well below 2."""
    start, end, n = 1e-4, 100.0, 80
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "dtype": "float64", "params": [1.0, -1.0],
                                                   "schedule": {"type": "lr_range_test", "start_lr": start,
                                                                "end_lr": end, "num_steps": n}})).json()["id"]
    theta = np.array([1.0, -1.0])
    for _ in range(n):
        answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": theta.tolist(),
                                                                     "loss": float(theta @ theta) / 2})
        if answer.status_code == 422:  # the loss diverged: the test stops there
            assert "diverged" in answer.json()["detail"]
            break
        assert answer.status_code == 200
        theta = np.array(answer.json()["params"])
    lrs = [h["lr"][0] for h in (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]]
    assert 30 < len(lrs) < n  # it ran past lr 2, where GD on this quadratic diverges, and stopped
    np.testing.assert_allclose(lrs, start * (end / start) ** (np.arange(len(lrs)) / (n - 1)), rtol=1e-12)
    again = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": theta.tolist(),
                                                                "loss": float(theta @ theta) / 2})
    assert again.status_code == 422 and "diverged" in again.json()["detail"]
    found = (await client.get(f"/v1/sessions/{sid}/diagnosis")).json()
    suggested = found["evidence"]["suggested_lr"]
    assert 1e-3 < suggested["steepest"] < 2 and 1e-3 < suggested["valley"] < 2, found
    assert "suggest" in found["suggestion"] or str(round(suggested["valley"], 3))[:3] in found["suggestion"]


@pytest.mark.parametrize("options", [
    {},
    {"mode": "min", "factor": 0.5, "patience": 3, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 2,
     "min_lr": [0.004, 0.02]},
    {"mode": "max", "factor": 0.3, "patience": 5, "cooldown": 1, "min_lr": 0.001, "eps": 1e-3},
])
async def test_reduce_on_plateau_follows_the_loss_as_torch(client, options):
    """Two param groups, 150 steps: the loss falls, then stalls; a step now and then sends no loss
    (a torch loop that skips scheduler.step then). Every step's lr and the weights equal torch's;
    the state survives a checkpoint."""
    rng = np.random.default_rng(5)
    start = {"w": rng.standard_normal(3), "b": rng.standard_normal(2)}
    body = {"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.5}, "dtype": "float64",
            "params": {k: v.tolist() for k, v in start.items()}, "param_groups": [{"params": ["b"], "lr": 0.3}],
            "schedule": {"type": "reduce_on_plateau", **options}}
    sid = (await client.post("/v1/sessions", json=body)).json()["id"]
    w, b = (torch.tensor(v, requires_grad=True) for v in start.values())
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 0.3}], lr=0.1, momentum=0.5)
    torch_options = {k: v for k, v in options.items()}
    scheduler = ls.ReduceLROnPlateau(opt, **torch_options)
    for t in range(150):
        loss = (2.0 / (t + 1) if t < 40 else 0.05 + 0.001 * rng.standard_normal()) * (1 if options.get("mode") != "max" else -1)
        sent = None if t % 17 == 5 else loss
        g = {"w": rng.standard_normal(3), "b": rng.standard_normal(2)}
        w.grad, b.grad = torch.tensor(g["w"]), torch.tensor(g["b"])
        opt.step()
        if sent is not None:
            scheduler.step(sent)
        payload = {"gradients": {k: v.tolist() for k, v in g.items()}}
        if sent is not None:
            payload["loss"] = sent
        answer = await client.post(f"/v1/sessions/{sid}/step", json=payload)
        assert answer.status_code == 200, answer.text
        if t == 75:  # resume from a checkpoint halfway
            state = (await client.get(f"/v1/sessions/{sid}/state")).json()
            assert "schedule_state" in state["state"]
            sid = (await client.post("/v1/sessions", json=state)).json()["id"]
    np.testing.assert_allclose(answer.json()["params"]["w"], w.detach().numpy(), rtol=1e-7)
    np.testing.assert_allclose(answer.json()["params"]["b"], b.detach().numpy(), rtol=1e-7)
    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert meta["next_lr"] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12)
    lrs = [h["lr"] for h in (await client.get(f"/v1/sessions/{sid}/history")).json()["history"]]
    assert lrs and all(len(x) == 2 for x in lrs)
