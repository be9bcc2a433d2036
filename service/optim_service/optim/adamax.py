"""Adamax: Adam with the infinity norm, u ← max(β₂u, |g| + ε), in place of the second moment."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from . import kernels
from .adam import BetasChecked
from .base import Bool, Float, Optimizer, decay_scalars, directed, lerp_, zeros
from .kernels import directed_at, finite, lerp


class AdamaxHyperparameters(BetasChecked):
    lr: Float = 2e-3
    eps: Float = 1e-8
    weight_decay: Float = 0.0
    maximize: Bool = False


class AdamaxState(NamedTuple):
    exp_avg: np.ndarray
    exp_inf: np.ndarray


def init(param: np.ndarray, hp: AdamaxHyperparameters) -> AdamaxState:
    return AdamaxState(zeros(param), zeros(param))


def update(param, grad, state: AdamaxState, hp: AdamaxHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    grad = directed(param, grad, hp)
    lerp_(state.exp_avg, grad, 1 - beta1)
    state.exp_inf[...] *= beta2
    np.maximum(state.exp_inf, np.abs(grad) + hp.eps, out=state.exp_inf)
    param -= hp.lr / (1 - beta1**step) * state.exp_avg / state.exp_inf  # addcdiv, value −clr


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    b1_c: float  # 1 − β₁ (< 0.5: torch's lerp formula for it)
    b2: float
    eps: float
    clr: float  # lr / (1 − β₁ᵗ)


@kernels.kernel
def _adamax(p, g, m, u, p0, m0, u0, sign, wd, decay, b1_c, b2, eps, clr):
    f = p.dtype.type
    sign, wd, decay, b1_c, b2, eps, clr = f(sign), f(wd), f(decay), f(b1_c), f(b2), f(eps), f(clr)
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        mi = lerp(m0[i], gi, b1_c)
        m[i] = mi
        ui = max(u0[i] * b2, abs(gi) + eps)
        u[i] = ui
        pi = pi - clr * mi / ui
        p[i] = pi
        bad += not finite(pi, mi, ui, gr)
    return bad


@kernels.torch_lerp(update)
def fused(param, grad, state: AdamaxState, hp: AdamaxHyperparameters, step: int, source=None) -> int:
    beta1, beta2 = hp.betas
    return kernels.apply(_adamax, param, grad, state, source,
                         Scalars(*decay_scalars(hp), 1 - beta1, beta2, hp.eps, hp.lr / (1 - beta1**step)))


adamax = Optimizer(
    "adamax", AdamaxHyperparameters, init, update, fused, AdamaxState,
    "m ← β₁m + (1−β₁)g, u ← max(β₂u, |g| + ε), θ ← θ − η/(1−β₁ᵗ)·m/u (torch.optim.Adamax)",
    ("exp_inf",), torch="Adamax", warm=({},),
)
