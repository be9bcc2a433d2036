"""The gradient-descent lessons' own forms, as docs/math.md configures them, against numpy
transcriptions of the lessons' formulas (t from 0), float64, through the API."""

from __future__ import annotations

import numpy as np

STEPS = 30


def gradients(n: int = 3):
    rng = np.random.default_rng(7)
    return [rng.standard_normal(n) for _ in range(STEPS)]


async def run(client, body: dict) -> np.ndarray:
    sid = (await client.post("/v1/sessions", json={**body, "dtype": "float64", "params": [1.0, -2.0, 0.5]})).json()["id"]
    params = None
    for g in gradients():
        params = (await client.post(f"/v1/sessions/{sid}/step", json={"gradients": g.tolist()})).json()["params"]
    return np.array(params)


async def test_the_lessons_adagrad_is_adagrad_without_eps_and_without_a_schedule(client):
    eta, theta, squares = 0.1, np.array([1.0, -2.0, 0.5]), np.zeros(3)
    for t, g in enumerate(gradients()):
        squares += g**2
        sigma = np.sqrt(squares / (t + 1))  # the root mean square of all past gradients
        theta = theta - (eta / np.sqrt(t + 1)) / sigma * g  # with time decay
    ours = await run(client, {"optimizer": {"type": "adagrad", "lr": eta, "eps": 0.0}})
    np.testing.assert_allclose(ours, theta, rtol=1e-12)
    twice = await run(client, {"optimizer": {"type": "adagrad", "lr": eta, "eps": 0.0},
                               "schedule": {"type": "inverse_sqrt"}})
    assert not np.allclose(twice, theta, rtol=1e-3)  # inverse_sqrt on top decays twice


async def test_the_lessons_rmsprop_starts_from_the_first_gradient(client):
    eta, alpha, theta, sigma = 0.01, 0.9, np.array([1.0, -2.0, 0.5]), None
    for g in gradients():
        sigma = np.abs(g) if sigma is None else np.sqrt(alpha * sigma**2 + (1 - alpha) * g**2)
        theta = theta - eta / sigma * g
    ours = await run(client, {"optimizer": {"type": "rmsprop", "lr": eta, "alpha": alpha,
                                            "square_avg_init": "first_grad", "eps": 0.0}})
    np.testing.assert_allclose(ours, theta, rtol=1e-12)


async def test_the_lessons_momentum_and_time_decay(client):
    eta, lam, theta, v = 0.05, 0.9, np.array([1.0, -2.0, 0.5]), np.zeros(3)
    for g in gradients():
        v = lam * v - eta * g
        theta = theta + v
    ours = await run(client, {"optimizer": {"type": "sgd", "lr": eta, "momentum": lam}})
    np.testing.assert_allclose(ours, theta, rtol=1e-12)
    theta = np.array([1.0, -2.0, 0.5])
    for t, g in enumerate(gradients()):
        theta = theta - eta / np.sqrt(t + 1) * g
    ours = await run(client, {"optimizer": {"type": "sgd", "lr": eta}, "schedule": {"type": "inverse_sqrt"}})
    np.testing.assert_allclose(ours, theta, rtol=1e-12)


def test_the_lessons_example_runs_and_the_diagnosis_names_each_learning_rate(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "lessons.py"
    result = subprocess.run([sys.executable, str(example), server.url, "--steps", "30", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["learning rate too small (1e-6): too_slow", "learning rate right (0.5): healthy",
                         "learning rate too large (2.5): diverging"]
    finals = {line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in lines[3:]}
    assert finals["quadratic, Adam"] < finals["quadratic, gradient descent"]  # adaptive steps beat the capped lr
    assert finals["regression, standardised features"] < 1e-3 * finals[
        "regression, raw features (the largest lr that does not diverge)"]
    for name in ("lesson-learning-rate.png", "lesson-optimizers.png", "lesson-feature-scaling.png"):
        assert (tmp_path / name).stat().st_size > 10_000
