"""The numpy optimizers equal torch.optim: every optimizer × flag combination × dtype, schedules,
clipping and param groups, over 25+ steps of the same random gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from optim_service.optim.config import TrainingConfig, apply_step
from torch_oracle import run_torch

STEPS = 30
TOL = {"float64": dict(rtol=1e-7, atol=0), "float32": dict(rtol=1e-5, atol=1e-6)}


# tensors per optimizer where the default (a matrix and a vector) does not fit: Muon takes 2-D only
# (a tall one is transposed), Adafactor factors the last two dimensions of a stack too
SHAPES = {"muon": {"w": (3, 4), "v": (6, 2)}, "adafactor": {"w": (3, 4), "b": (5,), "t": (2, 3, 4)}}


def problem(seed: int = 0, steps: int = STEPS, shapes: dict | None = None):
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(size=s) for n, s in (shapes or {"w": (3, 4), "b": (5,)}).items()}
    grads = [{n: rng.normal(size=v.shape) * 0.5 for n, v in params.items()} for _ in range(steps)]
    return params, grads


def run_numpy(config: dict, params, grads, dtype, fused: bool = True):
    cfg = TrainingConfig.model_validate(config)
    names = list(params)
    hps = cfg.hyperparameters_for(names)
    ps = [params[n].astype(dtype) for n in names]
    states = cfg.initial_states(names, ps, hps)
    for step, g in enumerate(grads, start=1):
        apply_step(cfg, hps, ps, [g[n].astype(dtype) for n in names], states, step, fused)
    return dict(zip(names, ps)), {n: {k: v for k, v in s._asdict().items() if v is not None}
                                  for n, s in zip(names, states)}


def assert_parity(config, dtype, seed=0, torch_kwargs=None, fused=True):
    kind = config["optimizer"]["type"]
    params, grads = problem(seed, shapes=SHAPES.get(kind))
    ours_p, ours_s = run_numpy(config, params, grads, dtype, fused)
    ref_p, ref_s = run_torch(config["optimizer"], params, grads, dtype=dtype,
                             schedule=config.get("schedule"), clip=config.get("clip_grad_norm"),
                             param_groups=config.get("param_groups"), **(torch_kwargs or {}))
    for n in params:
        assert ours_p[n].dtype == np.dtype(dtype)
        np.testing.assert_allclose(ours_p[n], ref_p[n], **param_tolerance(config, dtype, params[n].shape),
                                   err_msg=f"param {n}")
        ref_buffers = {k: v for k, v in ref_s[n].items() if v is not None}
        assert set(ours_s[n]) == set(ref_buffers), (ours_s[n].keys(), ref_buffers.keys())
        for k in ref_buffers:
            np.testing.assert_allclose(ours_s[n][k], ref_buffers[k], **TOL[dtype], err_msg=f"{n}.{k}")


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def valid_sgd(hp):
    return not hp["nesterov"] or (hp["momentum"] > 0 and hp["dampening"] == 0)


FLAG_GRID = {
    "sgd": [hp for hp in grid(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.3],
                              nesterov=[False, True], weight_decay=[0.0, 0.1],
                              maximize=[False, True]) if valid_sgd(hp)],
    "adagrad": grid(lr=[0.1], lr_decay=[0.0, 0.05], weight_decay=[0.0, 0.1],
                    initial_accumulator_value=[0.0, 0.2], eps=[1e-10], maximize=[False, True]),
    "rmsprop": grid(lr=[0.01], alpha=[0.9], weight_decay=[0.0, 0.1], momentum=[0.0, 0.8],
                    centered=[False, True], maximize=[False, True]),
    "adam": grid(lr=[0.02], betas=[[0.8, 0.95]], weight_decay=[0.0, 0.1], amsgrad=[False, True],
                 maximize=[False, True], decoupled_weight_decay=[False, True]),
    "adamw": grid(lr=[0.02], weight_decay=[0.0, 0.1], amsgrad=[False, True], maximize=[False, True]),
    "adamax": grid(lr=[0.02], betas=[[0.8, 0.95]], weight_decay=[0.0, 0.1], maximize=[False, True]),
    "nadam": grid(lr=[0.02], betas=[[0.8, 0.95]], weight_decay=[0.0, 0.1], momentum_decay=[4e-3, 0.1],
                  decoupled_weight_decay=[False, True], maximize=[False, True]),
    "radam": grid(lr=[0.02], betas=[[0.8, 0.95], [0.9, 0.999]], weight_decay=[0.0, 0.1],
                  decoupled_weight_decay=[False, True], maximize=[False, True]),
    "adadelta": grid(lr=[1.0, 0.5], rho=[0.9], weight_decay=[0.0, 0.1], maximize=[False, True]),
    "rprop": grid(lr=[0.01], etas=[[0.5, 1.2], [0.3, 1.5]], step_sizes=[[1e-6, 50], [1e-3, 0.05]],
                  maximize=[False, True]),
    "asgd": grid(lr=[0.05], lambd=[1e-4, 0.01], t0=[1e6, 5.0], weight_decay=[0.0, 0.1], maximize=[False, True]),
    "adafactor": grid(lr=[0.01, 0.5], eps=[[None, 1e-3], [1e-20, 1e-2]], d=[1.0, 2.0], weight_decay=[0.0, 0.1],
                      maximize=[False, True]),
    "muon": grid(lr=[0.02], weight_decay=[0.0, 0.1], momentum=[0.95, 0.5], nesterov=[True, False],
                 adjust_lr_fn=[None, "match_rms_adamw"]),
}
CASES = [(kind, hp) for kind, hps in FLAG_GRID.items() for hp in hps]
MUON_STEP = 2.0**-8  # one bfloat16 step of an element of O (torch sums its products in another order)


def param_tolerance(config: dict, dtype: str, shape) -> dict:
    """The dtype's tolerance; Muon's parameters within a few bfloat16 steps of its update per step."""
    hp = config["optimizer"]
    if hp["type"] != "muon":
        return TOL[dtype]
    from optim_service.optim.muon import adjusted_lr

    return dict(rtol=0, atol=STEPS * MUON_STEP * adjusted_lr(hp.get("lr", 1e-3), hp.get("adjust_lr_fn"), shape))


@pytest.mark.parametrize("path", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind,hp", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_every_flag_combination_matches_torch(kind, hp, dtype, path):
    assert_parity({"optimizer": {"type": kind, **hp}}, dtype, fused=path == "fused")


@pytest.mark.parametrize("kind", list(FLAG_GRID))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_defaults_match_torch(kind, dtype):
    assert_parity({"optimizer": {"type": kind}}, dtype)


@pytest.mark.parametrize("path", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)])
def test_rmsprop_lecture_form_first_grad(centered, momentum, dtype, path):
    hp = {"type": "rmsprop", "lr": 0.01, "alpha": 0.9, "centered": centered, "momentum": momentum,
          "square_avg_init": "first_grad"}
    assert_parity({"optimizer": hp}, dtype, torch_kwargs={"first_grad_square_avg": True}, fused=path == "fused")


def test_first_grad_is_the_lecture_sigma0():
    """σ⁰ = |g⁰|: the first RMSProp step moves every coordinate by exactly η (when ε is negligible)."""
    cfg = {"optimizer": {"type": "rmsprop", "lr": 0.1, "eps": 0.0, "square_avg_init": "first_grad"}}
    params, grads = problem(steps=1)
    out, state = run_numpy(cfg, params, grads, "float64")
    np.testing.assert_allclose(params["w"] - out["w"], 0.1 * np.sign(grads[0]["w"]), rtol=1e-12)
    np.testing.assert_allclose(state["w"]["square_avg"], grads[0]["w"] ** 2, rtol=1e-12)


SCHEDULES = [
    {"type": "inverse_sqrt"},
    {"type": "step", "step_size": 4, "gamma": 0.5},
    {"type": "exponential", "gamma": 0.9},
    {"type": "cosine", "T_max": 10, "eta_min": 0.001},
    {"type": "multistep", "milestones": [3, 7, 20], "gamma": 0.3},
    {"type": "linear", "start_factor": 0.25, "end_factor": 1.0, "total_iters": 8},
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=[s["type"] for s in SCHEDULES])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adagrad"])
def test_schedules_match_torch_schedulers(schedule, kind, dtype):
    hp = {"type": kind, "lr": 0.05, **({"momentum": 0.9} if kind == "sgd" else {})}
    assert_parity({"optimizer": hp, "schedule": schedule}, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, 0.5, "inf"])
def test_clip_grad_norm_matches_torch(norm_type, dtype):
    cfg = {"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
           "clip_grad_norm": {"max_norm": 0.7, "norm_type": norm_type}}
    assert_parity(cfg, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind,override", [
    ("adam", {"lr": 0.1, "weight_decay": 0.05, "amsgrad": True}),
    ("sgd", {"lr": 0.5, "momentum": 0.5, "nesterov": True}),
    ("rmsprop", {"centered": True, "momentum": 0.3}),
    ("adagrad", {"lr_decay": 0.1}),
])
def test_param_groups_match_torch(kind, override, dtype):
    cfg = {"optimizer": {"type": kind, "lr": 0.01}, "param_groups": [{"params": ["b"], **override}],
           "schedule": {"type": "step", "step_size": 5, "gamma": 0.5}}
    assert_parity(cfg, dtype)


BAD_HYPERPARAMETERS = [
    ("sgd", {"lr": -0.1}), ("sgd", {"momentum": -1.0}), ("sgd", {"weight_decay": -1.0}),
    ("sgd", {"nesterov": True}), ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("adagrad", {"lr": -1.0}), ("adagrad", {"lr_decay": -1.0}), ("adagrad", {"weight_decay": -1.0}),
    ("adagrad", {"initial_accumulator_value": -1.0}), ("adagrad", {"eps": -1.0}),
    ("rmsprop", {"lr": -1.0}), ("rmsprop", {"eps": -1.0}), ("rmsprop", {"momentum": -1.0}),
    ("rmsprop", {"weight_decay": -1.0}), ("rmsprop", {"alpha": -1.0}),
    ("adam", {"lr": -1.0}), ("adam", {"eps": -1.0}), ("adam", {"betas": [1.0, 0.9]}),
    ("adam", {"betas": [0.9, -0.1]}), ("adam", {"weight_decay": -1.0}),
    ("adamw", {"lr": -1.0}), ("adamw", {"betas": [0.9, 1.5]}),
    ("adamax", {"lr": -1.0}), ("adamax", {"betas": [1.0, 0.9]}), ("adamax", {"weight_decay": -1.0}),
    ("nadam", {"eps": -1.0}), ("nadam", {"momentum_decay": -1.0}), ("radam", {"betas": [0.9, 1.0]}),
    ("adadelta", {"rho": 1.5}), ("adadelta", {"eps": -1.0}), ("adadelta", {"weight_decay": -1.0}),
    ("rprop", {"lr": -1.0}), ("rprop", {"etas": [1.5, 1.2]}), ("rprop", {"etas": [0.5, 0.9]}),
    ("asgd", {"lr": -1.0}), ("asgd", {"weight_decay": -1.0}),
    ("adafactor", {"lr": -1.0}), ("adafactor", {"beta2_decay": 0.5}), ("adafactor", {"eps": [-1.0, 1e-3]}),
    ("adafactor", {"eps": [None, -1.0]}), ("adafactor", {"d": 0.5}), ("adafactor", {"weight_decay": -1.0}),
    ("muon", {"lr": -1.0}), ("muon", {"momentum": -1.0}), ("muon", {"weight_decay": -1.0}),
]


@pytest.mark.parametrize("kind,bad", BAD_HYPERPARAMETERS)
def test_validation_messages_are_torchs(kind, bad):
    import torch
    from pydantic import ValidationError

    from torch_oracle import TORCH_CLASSES

    from torch_oracle import TUPLES

    torch_kwargs = {k: tuple(v) if k in TUPLES and isinstance(v, list) else v for k, v in bad.items()}
    with pytest.raises(ValueError) as torch_error:
        TORCH_CLASSES[kind]([torch.zeros(1, 1, requires_grad=True)], **torch_kwargs)
    with pytest.raises(ValidationError) as ours:
        TrainingConfig.model_validate({"optimizer": {"type": kind, **bad}})
    assert str(torch_error.value) in str(ours.value)
