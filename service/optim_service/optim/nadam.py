"""NAdam (Dozat 2016): Adam with Nesterov momentum, its momentum decaying as μₜ = β₁(1 − ½·0.96^(t·ψ)).

The product μ₁⋯μₜ is state (``mu_product``, one number per tensor, kept in the session's dtype as
torch keeps it under its default dtype), so a tensor that skips steps keeps its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .adam import BetasChecked, moments_
from .base import (
    SCALAR, Bool, Float, Optimizer, decay_scalars, directed, read_from, require_non_negative, zeros,
)
from .kernels import directed_at, finite, moments_at


class NAdamHyperparameters(BetasChecked):
    lr: Float = 2e-3
    momentum_decay: Float = 4e-3
    decoupled_weight_decay: Bool = False
    maximize: Bool = False

    @model_validator(mode="after")
    def _momentum_decay(self):
        require_non_negative(self, momentum_decay="momentum_decay value")
        return self


class NAdamState(NamedTuple):
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    mu_product: np.ndarray  # shape ()


def init(param: np.ndarray, hp: NAdamHyperparameters) -> NAdamState:
    return NAdamState(zeros(param), zeros(param), np.ones((), param.dtype))


def _mu(hp: NAdamHyperparameters, step: int) -> float:
    return hp.betas[0] * (1.0 - 0.5 * (0.96 ** (step * hp.momentum_decay)))


def update(param, grad, state: NAdamState, hp: NAdamHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    grad = directed(param, grad, hp)
    mu, mu_next = _mu(hp, step), _mu(hp, step + 1)
    state.mu_product[...] *= mu  # in the tensor's dtype, as torch's
    moments_(state, grad, beta1, beta2)
    denom = np.sqrt(state.exp_avg_sq / (1 - beta2**step))
    denom += hp.eps
    mu_product = float(state.mu_product)
    param += -hp.lr * (1.0 - mu) / (1.0 - mu_product) * grad / denom
    param += (-hp.lr * mu_next) / (1.0 - mu_product * mu_next) * state.exp_avg / denom


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    b1_c: float
    b2: float
    b2_c: float
    bc2: float  # 1 − β₂ᵗ
    eps: float
    c_grad: float  # −lr(1 − μₜ)/(1 − Πμ)
    c_avg: float  # −lr·μₜ₊₁/(1 − Πμ·μₜ₊₁)


@kernels.kernel
def _nadam(p, g, m, v, p0, m0, v0, sign, wd, decay, b1_c, b2, b2_c, bc2, eps, c_grad, c_avg):
    f = p.dtype.type
    sign, wd, decay, b1_c, b2 = f(sign), f(wd), f(decay), f(b1_c), f(b2)
    b2_c, bc2, eps, c_grad, c_avg = f(b2_c), f(bc2), f(eps), f(c_grad), f(c_avg)
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        mi, vi = moments_at(m, v, m0, v0, i, gi, b1_c, b2, b2_c)
        d = np.sqrt(vi / bc2) + eps
        pi = pi + c_grad * gi / d
        pi = pi + c_avg * mi / d
        p[i] = pi
        bad += not finite(pi, mi, vi, gr)
    return bad


@kernels.torch_lerp(update)
def fused(param, grad, state: NAdamState, hp: NAdamHyperparameters, step: int, source=None) -> int:
    beta1, beta2 = hp.betas
    mu, mu_next = _mu(hp, step), _mu(hp, step + 1)
    state.mu_product[...] = read_from(param, state, source)[1].mu_product * mu
    mu_product = float(state.mu_product)
    bad = kernels.apply(_nadam, param, grad, state, source, Scalars(
        *decay_scalars(hp), 1 - beta1, beta2, 1 - beta2, 1 - beta2**step, hp.eps,
        -hp.lr * (1.0 - mu) / (1.0 - mu_product), (-hp.lr * mu_next) / (1.0 - mu_product * mu_next)),
        buffers=("exp_avg", "exp_avg_sq"))
    return bad + (not math.isfinite(mu_product))


nadam = Optimizer(
    "nadam", NAdamHyperparameters, init, update, fused, NAdamState,
    "Adam with Nesterov momentum and the momentum schedule μₜ = β₁(1 − ½·0.96^(tψ)) (torch.optim.NAdam)",
    ("exp_avg_sq",), shapes={"mu_product": SCALAR}, torch="NAdam", warm=({},),
)
