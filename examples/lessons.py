"""The gradient-descent lessons, run against a live optim-service through the SDK, with plots.

    python examples/lessons.py [URL] [--steps N] [--out DIR]

1. The learning rate, read off the loss curve: too small crawls, right descends, too large diverges
   (linear regression; the service's diagnosis names each).
2. Gradient descent, Adagrad, RMSProp, momentum and Adam on an ill-conditioned quadratic.
3. Feature scaling: the same regression with raw and with standardised features.

Each lesson writes a PNG (matplotlib) into --out and prints what the service's diagnosis says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from optim_client import OptimClient  # noqa: E402


def regression(scale: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((128, 2)) * np.array([1.0, 20.0])  # one feature 20× the other
    y = x @ np.array([2.0, -0.1]) + 0.5
    if scale:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x, y


def train(client, x, y, steps: int, label: str, **optimizer) -> tuple[list[float], dict]:
    """Least squares on (x, y) with the service stepping: the losses and the diagnosis."""
    w = np.zeros(x.shape[1] + 1)
    session = client.create_session(w, dtype="float64", **optimizer)
    losses = []
    for _ in tqdm(range(steps), desc=label, leave=False, file=sys.stderr):
        residual = x @ w[:-1] + w[-1] - y
        loss = float(np.mean(residual**2) / 2)
        losses.append(loss)
        if not np.isfinite(loss) or loss > 1e12:
            break
        grad = np.append(x.T @ residual, residual.sum()) / len(y)
        w = session.step(grad, loss=loss)
    diagnosis = client._send(_get(f"/v1/sessions/{session.id}/diagnosis"))
    session.delete()
    return losses, diagnosis


def _get(path: str):
    from optim_client._client import _Call

    return _Call("GET", path)


def save(fig, ax, title: str, path: Path) -> None:
    ax.set(xlabel="updates", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lesson_learning_rate(client, steps: int, out: Path) -> dict[str, str]:
    x, y = regression(True, np.random.default_rng(0))
    verdicts = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, lr in (("too small (1e-6)", 1e-6), ("right (0.5)", 0.5), ("too large (2.5)", 2.5)):
        losses, diagnosis = train(client, x, y, steps, label, optimizer="sgd", lr=lr)
        verdicts[label] = diagnosis["verdict"]
        ax.semilogy(losses, label=f"lr {label}: {diagnosis['verdict']}")
    save(fig, ax, "The learning rate, read off the loss curve", out / "lesson-learning-rate.png")
    return verdicts


def lesson_optimizers(client, steps: int, out: Path) -> dict[str, float]:
    """f(θ) = ½(θ₁² + 50·θ₂²): the steep direction caps plain GD's learning rate."""
    curvature = np.array([1.0, 50.0])
    finals = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, optimizer in (("gradient descent", {"optimizer": "sgd", "lr": 0.019}),
                             ("Adagrad", {"optimizer": "adagrad", "lr": 0.5}),
                             ("RMSProp", {"optimizer": "rmsprop", "lr": 0.05}),
                             ("momentum", {"optimizer": "sgd", "lr": 0.019, "momentum": 0.9}),
                             ("Adam", {"optimizer": "adam", "lr": 0.1})):
        theta = np.array([1.0, 1.0])
        session = client.create_session(theta, dtype="float64", **optimizer)
        losses = []
        for _ in tqdm(range(steps), desc=label, leave=False, file=sys.stderr):
            losses.append(float(0.5 * curvature @ theta**2))
            theta = session.step(curvature * theta, loss=losses[-1])
        session.delete()
        finals[label] = losses[-1]
        ax.semilogy(losses, label=label)
    save(fig, ax, "An ill-conditioned quadratic (curvatures 1 and 50)", out / "lesson-optimizers.png")
    return finals


def lesson_feature_scaling(client, steps: int, out: Path) -> dict[str, float]:
    finals = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, scale, lr in (("raw features (the largest lr that does not diverge)", False, 0.004),
                             ("standardised features", True, 0.5)):
        x, y = regression(scale, np.random.default_rng(1))
        losses, _ = train(client, x, y, steps, label, optimizer="sgd", lr=lr)
        finals[label] = losses[-1]
        ax.semilogy(losses, label=label)
    save(fig, ax, "Feature scaling: one learning rate fits every dimension", out / "lesson-feature-scaling.png")
    return finals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with OptimClient(args.url) as client:
        for label, verdict in lesson_learning_rate(client, args.steps, args.out).items():
            print(f"learning rate {label}: {verdict}")
        for label, loss in lesson_optimizers(client, args.steps, args.out).items():
            print(f"quadratic, {label}: final loss {loss:.3g}")
        for label, loss in lesson_feature_scaling(client, args.steps, args.out).items():
            print(f"regression, {label}: final loss {loss:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
