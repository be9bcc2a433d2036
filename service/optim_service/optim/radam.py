"""RAdam (Liu et al. 2020): Adam whose adaptive step is switched on, and rectified, once the variance
of the adaptive learning rate is tractable (ρₜ > 5); before that, momentum SGD with bias correction."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from . import kernels
from .adam import BetasChecked, moments_
from .base import Bool, Optimizer, decay_scalars, directed, zeros
from .kernels import directed_at, finite, moments_at


class RAdamHyperparameters(BetasChecked):
    decoupled_weight_decay: Bool = False
    maximize: Bool = False


class RAdamState(NamedTuple):
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray


def init(param: np.ndarray, hp: RAdamHyperparameters) -> RAdamState:
    return RAdamState(zeros(param), zeros(param))


def rectification(beta2: float, step: int) -> float | None:
    """r(ρₜ) when ρₜ > 5, else None (no adaptive step yet)."""
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t <= 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def update(param, grad, state: RAdamState, hp: RAdamHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    grad = directed(param, grad, hp)
    moments_(state, grad, beta1, beta2)
    corrected = state.exp_avg / (1 - beta1**step)
    rect = rectification(beta2, step)
    if rect is None:
        param -= corrected * hp.lr
    else:
        adaptive = (1 - beta2**step) ** 0.5 / (np.sqrt(state.exp_avg_sq) + hp.eps)
        param -= corrected * hp.lr * adaptive * rect


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    b1_c: float
    b2: float
    b2_c: float
    bc1: float  # 1 − β₁ᵗ
    lr: float
    bc2_sqrt: float  # √(1 − β₂ᵗ)
    eps: float
    rect: float  # r(ρₜ), or 0: not yet rectified (momentum SGD)


@kernels.kernel
def _radam(p, g, m, v, p0, m0, v0, sign, wd, decay, b1_c, b2, b2_c, bc1, lr, bc2_sqrt, eps, rect):
    f = p.dtype.type
    sign, wd, decay, b1_c, b2, b2_c = f(sign), f(wd), f(decay), f(b1_c), f(b2), f(b2_c)
    bc1, lr, bc2_sqrt, eps, rect = f(bc1), f(lr), f(bc2_sqrt), f(eps), f(rect)
    rectified = rect != 0.0  # the same every element: LLVM hoists the branch out of the loop
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        mi, vi = moments_at(m, v, m0, v0, i, gi, b1_c, b2, b2_c)
        x = mi / bc1 * lr
        if rectified:
            x = x * (bc2_sqrt / (np.sqrt(vi) + eps)) * rect
        pi = pi - x
        p[i] = pi
        bad += not finite(pi, mi, vi, gr)
    return bad


@kernels.torch_lerp(update)
def fused(param, grad, state: RAdamState, hp: RAdamHyperparameters, step: int, source=None) -> int:
    beta1, beta2 = hp.betas
    return kernels.apply(_radam, param, grad, state, source, Scalars(
        *decay_scalars(hp), 1 - beta1, beta2, 1 - beta2, 1 - beta1**step, hp.lr, (1 - beta2**step) ** 0.5, hp.eps,
        rectification(beta2, step) or 0.0))


radam = Optimizer(
    "radam", RAdamHyperparameters, init, update, fused, RAdamState,
    "Adam rectified: the adaptive step, scaled by r(ρₜ), once ρₜ > 5; momentum SGD before (torch.optim.RAdam)",
    ("exp_avg_sq",), torch="RAdam", warm=({},),
)
