"""The JavaScript client: its own node --test suite, and a JS training run equal to torch.optim."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import SERVICE_BIN
from torch_oracle import run_torch

JS = Path(__file__).parents[1] / "clients" / "js"
CASES = [
    {"type": "adam", "lr": 0.02, "amsgrad": True},
    {"type": "adamw", "lr": 0.02},
    {"type": "sgd", "lr": 0.05, "momentum": 0.9},
    {"type": "rmsprop", "lr": 0.01, "centered": True},
    {"type": "adagrad", "lr": 0.1},
]


def node() -> str:
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is not installed (Node 18+ is needed for clients/js)")
    return binary


def test_node_test_suite_passes():
    result = subprocess.run([node(), "--test", *sorted(str(p) for p in (JS / "test").glob("*.test.js"))],
                            cwd=JS, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "OPTIM_SERVICE_BIN": str(SERVICE_BIN)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 6" in result.stdout


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", CASES, ids=[c["type"] for c in CASES])
def test_javascript_training_equals_torch(server, tmp_path, optimizer, dtype):
    rng = np.random.default_rng(11)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    grads = [{n: rng.normal(size=v.shape) for n, v in params.items()} for _ in range(25)]
    schedule = {"type": "cosine", "T_max": 20}
    problem = {"optimizer": optimizer, "dtype": dtype, "schedule": schedule,
               "params": {n: {"data": v.ravel().tolist(), "shape": list(v.shape)} for n, v in params.items()},
               "gradients": [{n: g.ravel().tolist() for n, g in step.items()} for step in grads]}
    (tmp_path / "problem.json").write_text(json.dumps(problem))
    result = subprocess.run([node(), str(JS / "examples" / "train.mjs"), server.url, str(tmp_path / "problem.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected, _ = run_torch(optimizer, params, grads, dtype=dtype, schedule=schedule)
    tol = dict(rtol=1e-7, atol=0) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    for n in params:
        np.testing.assert_allclose(np.reshape(out[n], params[n].shape), expected[n], **tol)
