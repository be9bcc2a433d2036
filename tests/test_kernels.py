"""The fused numba kernels equal the numpy reference bit for bit, for every optimizer, flag
combination, dtype, size (serial and parallel variants), schedule and clipping."""

from __future__ import annotations

import numpy as np
import pytest

from optim_service.optim import OPTIMIZERS
from optim_service.optim.config import TrainingConfig, apply_step
from test_parity_torch import CASES

# the element-wise optimizers (any with a kernel): a tensor of any shape, joined or not
CASES = [(kind, hp) for kind, hp in CASES if OPTIMIZERS[kind].elementwise]


def run(config: dict, dtype, fused: bool, size: int, steps: int = 12):
    rng = np.random.default_rng(5)
    cfg = TrainingConfig.model_validate(config)
    names = ["w", "b"]
    shapes = [(size,), (3, 7)]
    params = [rng.normal(size=s).astype(dtype) for s in shapes]
    hps = cfg.hyperparameters_for(names)
    states = [cfg.algorithm.init(p, hp) for p, hp in zip(params, hps)]
    for step in range(1, steps + 1):
        grads = [(rng.normal(size=s) * 0.7).astype(dtype) for s in shapes]
        _, finite = apply_step(cfg, hps, params, grads, states, step, fused)
        assert finite
    return params, states


def assert_identical(config: dict, dtype, size: int):
    ref_p, ref_s = run(config, dtype, fused=False, size=size)
    out_p, out_s = run(config, dtype, fused=True, size=size)
    for a, b in zip(ref_p, out_p):
        np.testing.assert_array_equal(b, a)
    for sa, sb in zip(ref_s, out_s):
        for a, b in zip(sa, sb):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("size", [5, 100_003])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,hp", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_kernels_equal_the_numpy_reference_bit_for_bit(kind, hp, dtype, size):
    assert_identical({"optimizer": {"type": kind, **hp}}, dtype, size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extra", [
    {"optimizer": {"type": "rmsprop", "square_avg_init": "first_grad", "centered": True, "momentum": 0.3}},
    {"optimizer": {"type": "adam", "lr": 0.1}, "schedule": {"type": "cosine", "T_max": 5},
     "clip_grad_norm": {"max_norm": 0.5}},
    {"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9}, "param_groups": [{"params": ["b"], "lr": 0.3}]},
    {"optimizer": {"type": "adam", "betas": [0.3, 0.9]}},  # lerp's other branch (weight ≥ 0.5)
])
def test_kernels_with_lecture_forms_schedules_clipping_groups(extra, dtype):
    assert_identical(extra, dtype, 100)


def test_kernels_report_non_finite_gradients_and_results():
    cfg = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    for grad, param in ([np.array([1.0, np.nan], np.float32), np.ones(2, np.float32)],
                        [np.array([1e30, 1.0], np.float32), np.ones(2, np.float32)]):
        state = cfg.algorithm.init(param, cfg.optimizer)
        _, finite = apply_step(cfg, [cfg.optimizer], [param], [grad], [state], 1, fused=True)
        assert not finite


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("kind", ["adam", "rmsprop", "adagrad", "adamax", "nadam", "adadelta"])  # radam: no division before ρₜ > 5
def test_a_division_by_zero_is_a_non_finite_result_not_an_exception(kind, fused):
    """eps 0 and a zero gradient divide 0 by 0: NaN, as in numpy and torch, which the step refuses."""
    cfg = TrainingConfig.model_validate({"optimizer": {"type": kind, "eps": 0.0}})
    param = np.zeros(4, np.float32)
    state = cfg.algorithm.init(param, cfg.optimizer)
    _, finite = apply_step(cfg, [cfg.optimizer], [param], [np.zeros(4, np.float32)], [state], 1, fused)
    assert not finite


STEPS_AFTER_WARM = r"""
import asyncio, json, sys
import httpx, numpy as np
from optim_service.app import create_app
from optim_service.optim import kernels
from optim_service.settings import Settings

def compiled():
    return {(kind, name): len(getattr(k, kind).signatures) for name, k in kernels.KERNELS.items()
            for kind in ("parallel", "serial")}

async def main():
    app = create_app(Settings(store="memory"))
    async with app.router.lifespan_context(app):
        before = compiled()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            for optimizer in json.loads(sys.argv[1]):
                for dtype in ("float32", "float64"):
                    for size in (3, kernels.PARALLEL_MIN_ELEMENTS):
                        sid = (await http.post("/v1/sessions", json={"optimizer": optimizer, "dtype": dtype,
                               "params": {"a": [0.0] * size, "b": [0.0] * 2}})).json()["id"]
                        body = np.ones(size + 2, dtype).tobytes()
                        for r in (await http.post(f"/v1/sessions/{sid}/step", json={"gradients": {"a": [0.5] * size, "b": [0.5, 0.5]}}),
                                  await http.post(f"/v1/sessions/{sid}/step", content=body,
                                                  headers={"content-type": "application/octet-stream"})):
                            assert r.status_code == 200, r.text
        print(json.dumps({f"{k[0]}:{k[1]}": after - before[k] for k, after in compiled().items() if after != before[k]}))

asyncio.run(main())
"""


def test_steps_after_start_up_compile_nothing():
    """warm_kernels compiles every kernel as the step path calls it (a first request never waits on
    numba): in a fresh interpreter, JSON and binary steps of every variant add no signature."""
    import json
    import subprocess
    import sys

    from optim_service.optim import OPTIMIZERS

    variants = [{"type": name, **variant} for name, o in OPTIMIZERS.items() for variant in o.warm or ({},)
                if o.elementwise]
    result = subprocess.run([sys.executable, "-c", STEPS_AFTER_WARM, json.dumps(variants)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
