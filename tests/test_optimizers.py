"""Every optimizer in the registry through the API, on every store: listed with torch's defaults,
resumed bit-exactly from a JSON and a safetensors checkpoint, its scalar and factored buffers
stored in their own shapes; and the algorithm-specific promises (Muon's 2-D only, Adagrad's
constructor-wide accumulator, Lion as the paper writes it, Adafactor's m + n numbers)."""

from __future__ import annotations

import base64
import inspect

import numpy as np
import pytest
import safetensors.numpy
import torch

from optim_service.optim import OPTIMIZERS
from optim_service.optim.config import TrainingConfig, apply_step
from test_api import assert_problem, snapshot
from test_parity_torch import SHAPES, assert_parity

ST = "application/vnd.safetensors"
DEFAULT_SHAPES = {"w": (3, 4), "b": (5,)}  # a matrix and a vector; SHAPES where that does not fit
SETTINGS = {"asgd": {"t0": 2.0}, "rprop": {"lr": 0.05}}  # ASGD averages from step 3


def body(kind: str, rng, dtype: str = "float32") -> dict:
    shapes = SHAPES.get(kind, DEFAULT_SHAPES)
    return {"optimizer": {"type": kind, **SETTINGS.get(kind, {})}, "dtype": dtype,
            "params": {n: rng.normal(size=s).tolist() for n, s in shapes.items()}}


def grads_like(create: dict, rng) -> dict:
    return {n: (rng.normal(size=np.shape(v)) * 0.3).tolist() for n, v in create["params"].items()}


async def test_the_catalogue_lists_every_optimizer_with_torchs_defaults(client):
    catalogue = {o["type"]: o for o in (await client.get("/v1/optimizers")).json()}
    assert set(catalogue) == set(OPTIMIZERS) and len(catalogue) >= 15
    for kind, entry in catalogue.items():
        assert entry["buffer_shapes"].keys() == set(entry["state_buffers"])
        if entry["torch"] is None:
            continue
        signature = inspect.signature(getattr(torch.optim, entry["torch"].removeprefix("torch.optim.")).__init__)
        for name, hp in entry["hyperparameters"].items():
            if name in signature.parameters:
                default = signature.parameters[name].default
                expected = list(default) if isinstance(default, tuple) else default
                assert hp["default"] == expected, (kind, name)
    assert catalogue["nadam"]["buffer_shapes"]["mu_product"] == "scalar"
    assert catalogue["adafactor"]["buffer_shapes"] == {"row_var": "row", "col_var": "column", "variance": "param"}
    assert catalogue["lion"]["hyperparameters"]["betas"]["default"] == [0.9, 0.99]


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
async def test_every_optimizer_resumes_bit_exactly_from_its_checkpoints(client, kind):
    rng = np.random.default_rng(7)
    create = body(kind, rng)
    sid = (await client.post("/v1/sessions", json=create)).json()["id"]
    for _ in range(4):
        r = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": grads_like(create, rng)})
        assert r.status_code == 200, r.text
    checkpoint = await snapshot(client, sid)
    file = (await client.get(f"/v1/sessions/{sid}/state", headers={"Accept": ST})).content
    from_json = (await client.post("/v1/sessions", json=checkpoint)).json()["id"]
    from_file = (await client.post("/v1/sessions", content=file, headers={"Content-Type": ST})).json()["id"]
    for copy in (from_json, from_file):
        assert await snapshot(client, copy) == checkpoint
    for _ in range(3):
        grads = grads_like(create, rng)
        answers = [(await client.post(f"/v1/sessions/{s}/step", json={"gradients": grads},
                                      headers={"Accept": "application/octet-stream"})).content
                   for s in (sid, from_json, from_file)]
        assert answers[0] == answers[1] == answers[2]
    tensors = safetensors.numpy.load(file)
    for name, shape in SHAPES.get(kind, DEFAULT_SHAPES).items():
        for buffer, kind_of in OPTIMIZERS[kind].shapes.items():
            key = f"state/{name}/{buffer}"
            if key in tensors:  # a buffer in its own shape: a scalar is (), a row factor (..., m, 1)
                assert tensors[key].shape == OPTIMIZERS[kind].buffer_shape(buffer, shape)


async def test_scalar_and_factored_buffers_are_stored_in_their_own_shapes(client):
    rng = np.random.default_rng(1)
    nadam = (await client.post("/v1/sessions", json=body("nadam", rng, "float64"))).json()["id"]
    await client.post(f"/v1/sessions/{nadam}/step", json={"gradients": {"w": np.ones((3, 4)).tolist(), "b": [1.0] * 5}})
    state = (await snapshot(client, nadam))["state"]["buffers"]
    mu = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    assert state["w"]["mu_product"]["shape"] == []
    assert np.frombuffer(base64.b64decode(state["w"]["mu_product"]["b64"]), "<f8")[0] == mu
    m, n = 300, 200  # Adafactor keeps m + n numbers for an m×n matrix, Adam 2·m·n
    matrix = {"w": {"shape": [m, n], "b64": base64.b64encode(np.zeros((m, n), "<f4")).decode()}}
    for kind, numbers in (("adafactor", m + n), ("adam", 2 * m * n)):
        sid = (await client.post("/v1/sessions", json={"optimizer": {"type": kind}, "params": matrix, "dtype": "float32"},
                                 headers={"Prefer": "return=minimal"})).json()["id"]
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": matrix})
        file = safetensors.numpy.load((await client.get(f"/v1/sessions/{sid}/state", headers={"Accept": ST})).content)
        assert sum(a.size for k, a in file.items() if k.startswith("state/")) == numbers


async def test_muon_refuses_what_is_not_a_matrix_and_creates_nothing(client):
    before = (await client.get("/v1/sessions")).json()["sessions"]
    r = await client.post("/v1/sessions", json={"optimizer": {"type": "muon"},
                                                "params": {"w": [[1.0, 2.0], [3.0, 4.0]], "bias": [0.5, 0.5]}})
    assert_problem(r, 422, "'bias'", "2-D", "[2]", "adamw")
    assert (await client.get("/v1/sessions")).json()["sessions"] == before
    bad = {"optimizer": {"type": "muon", "ns_steps": 100}, "params": {"w": [[1.0]]}}
    assert_problem(await client.post("/v1/sessions", json=bad), 422, "ns_steps")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", ["fused", "numpy"])
def test_adagrad_fills_every_groups_sum_with_the_constructors_value_as_torch_does(dtype, path):
    """torch's Adagrad reads initial_accumulator_value from its constructor, never a group's."""
    config = {"optimizer": {"type": "adagrad", "lr": 0.1, "initial_accumulator_value": 0.5},
              "param_groups": [{"params": ["b"], "initial_accumulator_value": 3.0, "lr": 0.2}]}
    assert_parity(config, dtype, fused=path == "fused")
    cfg = TrainingConfig.model_validate(config)
    params = [np.zeros(2), np.zeros(3)]
    states = cfg.initial_states(["w", "b"], params, cfg.hyperparameters_for(["w", "b"]))
    assert [float(s.sum[0]) for s in states] == [0.5, 0.5]


def lion_as_the_paper_writes_it(theta, grads, lr, beta1, beta2, wd):
    """Chen et al. 2023, Algorithm 2 (Lion), transcribed line by line."""
    m = np.zeros_like(theta)
    for g in grads:
        c = beta1 * m + (1 - beta1) * g          # update interpolation
        theta = theta - lr * (np.sign(c) + wd * theta)  # update model parameters (decoupled decay)
        m = beta2 * m + (1 - beta2) * g          # update EMA of g
    return theta


@pytest.mark.parametrize("path", ["fused", "numpy"])
@pytest.mark.parametrize("hp", [{}, {"lr": 3e-3, "betas": [0.8, 0.95], "weight_decay": 0.5}])
def test_lion_is_the_papers_algorithm(hp, path):
    rng = np.random.default_rng(4)
    theta0 = rng.normal(size=50)
    grads = [rng.normal(size=50) for _ in range(40)]
    cfg = TrainingConfig.model_validate({"optimizer": {"type": "lion", **hp}})
    o = cfg.optimizer
    param = theta0.copy()
    state = cfg.algorithm.init(param, o)
    for t, g in enumerate(grads, start=1):
        _, finite = apply_step(cfg, [o], [param], [g], [state], t, fused=path == "fused")
        assert finite
    expected = lion_as_the_paper_writes_it(theta0, grads, o.lr, *o.betas, o.weight_decay)
    np.testing.assert_allclose(param, expected, rtol=1e-12, atol=1e-15)


def test_the_js_clients_types_name_every_optimizer():
    import pathlib
    import re

    typings = (pathlib.Path(__file__).parent.parent / "clients/js/index.d.ts").read_text()
    union = re.search(r"interface OptimizerConfig \{\s*type:([^;]+);", typings).group(1)
    assert set(re.findall(r'"(\w+)"', union)) == set(OPTIMIZERS)


async def test_a_hyperparameter_the_dtype_cannot_hold_as_state_is_refused_at_create(client):
    """ASGD keeps lr as its first step size and Rprop as every weight's: 1e300 is no float32."""
    for optimizer in ({"type": "asgd", "lr": 1e300}, {"type": "rprop", "lr": 1e300}):
        answer = await client.post("/v1/sessions", json={"optimizer": optimizer, "dtype": "float32", "params": [1.0]})
        assert_problem(answer, 422, "float32", "float64")
        fine = await client.post("/v1/sessions", json={"optimizer": optimizer, "dtype": "float64", "params": [1.0]})
        assert fine.status_code == 201
    assert len((await client.get("/v1/sessions")).json()["sessions"]) == 2


async def test_asgd_under_a_negative_scheduled_lr_steps_as_torch_does(client):
    """A cosine schedule with a negative eta_min takes ASGD's lr below 0, and its step size
    lr/(1 + λ·lr·t)^α then raises a negative number to a fractional power: a complex number in
    Python (once a 500 here), whose real part torch keeps in its eta tensor. So do we."""
    sid = (await client.post("/v1/sessions", json={
        "optimizer": {"type": "asgd", "lr": 0.0, "lambd": 1.0, "alpha": 0.5}, "dtype": "float64",
        "params": [1.0, -2.0], "schedule": {"type": "cosine", "T_max": 1, "eta_min": -2.0}})).json()["id"]
    torch.set_default_dtype(torch.float64)  # where torch keeps eta, as the session keeps it in its dtype
    try:
        p = torch.tensor([1.0, -2.0], requires_grad=True)
        opt = torch.optim.ASGD([p], lr=0.0, lambd=1.0, alpha=0.5)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1, eta_min=-2.0)
        for _ in range(4):  # lr 0, -2, 0, -2: the last eta is a complex number's real part
            p.grad = torch.tensor([0.5, -0.25])
            opt.step()
            scheduler.step()
            answer = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, -0.25]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["params"] == p.tolist()
    finally:
        torch.set_default_dtype(torch.float32)
    state = (await client.get(f"/v1/sessions/{sid}/state")).json()["state"]["buffers"]
    eta = np.frombuffer(base64.b64decode(state["eta"]["b64"]), np.float64)
    assert eta.tobytes() == opt.state[p]["eta"].numpy().tobytes() and eta[0] != 0
