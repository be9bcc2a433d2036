"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the sign of
an interpolation of momentum and gradient is the update, so every coordinate moves by exactly lr.

    θ ← θ·(1 − η·λ)
    c ← β₁m + (1−β₁)g
    θ ← θ − η·sign(c)
    m ← β₂m + (1−β₂)g

Not in torch.optim: this numpy code is its definition, and tests hold it to a transcription of the
paper's algorithm. Its lr is typically 3-10x smaller than AdamW's and its weight decay as much larger.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .adam import Betas
from .base import Bool, Float, Hyperparameters, Optimizer, require_non_negative, zeros
from .kernels import finite


class LionHyperparameters(Hyperparameters):
    lr: Float = 1e-4
    betas: Betas = (0.9, 0.99)
    weight_decay: Float = 0.0
    maximize: Bool = False

    @model_validator(mode="after")
    def _checks(self):
        require_non_negative(self, lr="learning rate")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        require_non_negative(self, weight_decay="weight_decay value")
        return self


class LionState(NamedTuple):
    exp_avg: np.ndarray


def init(param: np.ndarray, hp: LionHyperparameters) -> LionState:
    return LionState(zeros(param))


def update(param, grad, state: LionState, hp: LionHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    if hp.maximize:
        grad = -grad
    param *= 1 - hp.lr * hp.weight_decay
    interpolated = beta1 * state.exp_avg + (1 - beta1) * grad
    param -= hp.lr * np.sign(interpolated)
    state.exp_avg[...] = beta2 * state.exp_avg + (1 - beta2) * grad


class Scalars(NamedTuple):
    lr: float
    sign: float
    decay: float  # 1 − lr·wd
    b1: float
    b1_c: float
    b2: float
    b2_c: float


@kernels.kernel
def _lion(p, g, m, p0, m0, lr, sign, decay, b1, b1_c, b2, b2_c):
    f = p.dtype.type
    lr, sign, decay, b1, b1_c, b2, b2_c = f(lr), f(sign), f(decay), f(b1), f(b1_c), f(b2), f(b2_c)
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        pi = p0[i] * decay
        ci = b1 * m0[i] + b1_c * gi
        pi = pi - lr * np.sign(ci)
        p[i] = pi
        mi = b2 * m0[i] + b2_c * gi
        m[i] = mi
        bad += not finite(pi, mi, gr, ci)
    return bad


def fused(param, grad, state: LionState, hp: LionHyperparameters, step: int, source=None) -> int:
    beta1, beta2 = hp.betas
    return kernels.apply(_lion, param, grad, state, source, Scalars(
        hp.lr, -1.0 if hp.maximize else 1.0, 1 - hp.lr * hp.weight_decay, beta1, 1 - beta1, beta2, 1 - beta2))


lion = Optimizer(
    "lion", LionHyperparameters, init, update, fused, LionState,
    "c ← β₁m + (1−β₁)g, θ ← θ(1 − ηλ) − η·sign(c), m ← β₂m + (1−β₂)g (Chen et al. 2023)",
    warm=({},),
)
