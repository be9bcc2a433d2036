"""ASGD (Polyak & Juditsky 1992, torch's form): SGD with a decaying step ηₜ = lr/(1 + λ·lr·t)^α and,
from step t0 on, a running average of the iterates, ``ax``: the averaged parameters, which are what
averaged SGD hands back at the end (read them from ``GET .../state``, buffer ``ax``).

Its step size ``eta`` and averaging weight ``mu`` are state (one number per tensor each), kept in the
session's dtype as torch keeps them under its default dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pydantic import model_validator

from .base import SCALAR, Bool, Float, Hyperparameters, Optimizer, directed, reference_step, require_non_negative, zeros


class ASGDHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    lambd: Float = 1e-4
    alpha: Float = 0.75
    t0: Float = 1e6
    weight_decay: Float = 0.0
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(self, lr="learning rate", weight_decay="weight_decay value")
        # beyond torch's checks: with lambd < 0, (1 + lambd·lr·t)^alpha turns negative, then complex
        require_non_negative(self, lambd="lambd value")
        return self


class ASGDState(NamedTuple):
    eta: np.ndarray  # shape ()
    mu: np.ndarray  # shape ()
    ax: np.ndarray


def init(param: np.ndarray, hp: ASGDHyperparameters) -> ASGDState:
    return ASGDState(np.full((), hp.lr, param.dtype), np.ones((), param.dtype), zeros(param))


def update(param, grad, state: ASGDState, hp: ASGDHyperparameters, step: int) -> None:
    grad = directed(param, grad, hp)
    eta = float(state.eta)
    param *= 1 - hp.lambd * eta
    param -= eta * grad
    if float(state.mu) != 1:
        state.ax[...] += (param - state.ax) * state.mu
    else:
        state.ax[...] = param
    eta = hp.lr / (1 + hp.lambd * hp.lr * step) ** hp.alpha
    # complex when a schedule's negative lr takes the base below 0: torch copies it into its real
    # eta tensor, keeping the real part
    state.eta[...] = eta.real if isinstance(eta, complex) else eta
    state.mu[...] = 1 / max(1, step - hp.t0)


asgd = Optimizer(
    "asgd", ASGDHyperparameters, init, update, reference_step(update), ASGDState,
    "θ ← θ(1 − λη) − η·g, η ← lr/(1 + λ·lr·t)^α, ax averages θ from t0 on (torch.optim.ASGD)",
    shapes={"eta": SCALAR, "mu": SCALAR}, torch="ASGD",
)
