"""Adadelta (Zeiler 2012): RMSProp whose step is scaled by a running RMS of past updates, so it
carries the parameter's units; lr multiplies the update (torch's default 1.0 is the paper's)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .base import Bool, Float, Hyperparameters, Optimizer, decay_scalars, directed, require_non_negative, zeros
from .kernels import directed_at, ema_sq, finite


class AdadeltaHyperparameters(Hyperparameters):
    lr: Float = 1.0
    rho: Float = 0.9
    eps: Float = 1e-6
    weight_decay: Float = 0.0
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(self, lr="learning rate")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"Invalid rho value: {self.rho}")
        require_non_negative(self, eps="epsilon value", weight_decay="weight_decay value")
        return self


class AdadeltaState(NamedTuple):
    square_avg: np.ndarray
    acc_delta: np.ndarray


def init(param: np.ndarray, hp: AdadeltaHyperparameters) -> AdadeltaState:
    return AdadeltaState(zeros(param), zeros(param))


def update(param, grad, state: AdadeltaState, hp: AdadeltaHyperparameters, step: int) -> None:
    grad = directed(param, grad, hp)
    state.square_avg[...] *= hp.rho
    state.square_avg[...] += (1 - hp.rho) * grad * grad
    std = np.sqrt(state.square_avg + hp.eps)
    delta = np.sqrt(state.acc_delta + hp.eps)
    delta /= std
    delta *= grad
    state.acc_delta[...] *= hp.rho
    state.acc_delta[...] += (1 - hp.rho) * delta * delta
    param -= hp.lr * delta


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    lr: float
    rho: float
    rho_c: float  # 1 − ρ
    eps: float


@kernels.kernel
def _adadelta(p, g, s, a, p0, s0, a0, sign, wd, decay, lr, rho, rho_c, eps):
    f = p.dtype.type
    sign, wd, decay, lr, rho, rho_c, eps = f(sign), f(wd), f(decay), f(lr), f(rho), f(rho_c), f(eps)
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        si = ema_sq(s0[i], gi, rho, rho_c)
        s[i] = si
        delta = np.sqrt(a0[i] + eps) / np.sqrt(si + eps) * gi
        ai = ema_sq(a0[i], delta, rho, rho_c)
        a[i] = ai
        pi = pi - lr * delta
        p[i] = pi
        bad += not finite(pi, si, ai, gr)
    return bad


def fused(param, grad, state: AdadeltaState, hp: AdadeltaHyperparameters, step: int, source=None) -> int:
    return kernels.apply(_adadelta, param, grad, state, source,
                         Scalars(*decay_scalars(hp), hp.lr, hp.rho, 1 - hp.rho, hp.eps))


adadelta = Optimizer(
    "adadelta", AdadeltaHyperparameters, init, update, fused, AdadeltaState,
    "v ← ρv + (1−ρ)g², Δ ← √(u + ε)/√(v + ε)·g, u ← ρu + (1−ρ)Δ², θ ← θ − η·Δ (torch.optim.Adadelta)",
    ("square_avg", "acc_delta"), torch="Adadelta", warm=({},),
)
