"""Adagrad: divide by the root of the sum of all past squared gradients, per parameter."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .base import (
    Bool, Bounds, Float, Hyperparameters, Optimizer, Top, decay_scalars, directed, require_non_negative, zeros,
)
from .kernels import directed_at, finite, guarded


class AdagradHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    lr_decay: Float = 0.0
    weight_decay: Float = 0.0
    initial_accumulator_value: Float = 0.0
    eps: Float = 1e-10
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(
            self, lr="learning rate", lr_decay="lr_decay value", weight_decay="weight_decay value",
            initial_accumulator_value="initial_accumulator_value value", eps="epsilon value",
        )
        return self


class AdagradState(NamedTuple):
    sum: np.ndarray


def init(param: np.ndarray, hp: AdagradHyperparameters) -> AdagradState:
    value = hp.initial_accumulator_value
    return AdagradState(np.full_like(param, value) if value else zeros(param))


def update(param, grad, state: AdagradState, hp: AdagradHyperparameters, step: int) -> None:
    grad = directed(param, grad, hp)
    clr = hp.lr / (1 + (step - 1) * hp.lr_decay)
    state.sum[...] += grad * grad
    std = np.sqrt(state.sum)
    std += hp.eps
    param -= clr * grad / std  # torch's addcdiv order: (value·t1)/t2


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    clr: float  # lr / (1 + (t − 1)·lr_decay)
    eps: float


@kernels.kernel
def _adagrad(p, g, s, p0, s0, sign, wd, decay, clr, eps, top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, clr, eps = f(sign), f(wd), f(decay), f(clr), f(eps)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        si = s0[i] + gi * gi
        s[i] = si
        pi = pi - clr * gi / (np.sqrt(si) + eps)
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, si, gr, pi)
    return bad


def scalars(hp: AdagradHyperparameters, step: int) -> Scalars:
    return Scalars(*decay_scalars(hp), hp.lr / (1 + (step - 1) * hp.lr_decay), hp.eps)


def fused(param, grad, state: AdagradState, hp: AdagradHyperparameters, step: int, source=None,
          guard=kernels.UNGUARDED, out=None) -> int:
    return kernels.apply(_adagrad, param, grad, state, source, scalars(hp, step), guard=guard, out=out)


def bound(hp: AdagradHyperparameters, step: int, top: Top, g: float, dtype) -> Top:
    """``_adagrad``'s values, bounded: the sum holds this g², so |g|/(√s + ε) ≤ 1 (``Bounds.ratio``)."""
    b = Bounds(dtype)
    sign, wd, decay, clr, eps = b.cast(scalars(hp, step))
    b.positive(eps)
    p = b(top.param * decay)
    g = b(sign * g, wd * p)
    s = b(top.state.sum, b(g * g))
    b(math.sqrt(s), eps)
    b(clr * g)
    return Top(b(p, b(clr * b.ratio(g, eps))), AdagradState(s))


adagrad = Optimizer(
    "adagrad", AdagradHyperparameters, init, update, fused, AdagradState,
    "θ ← θ − η/(1+(t−1)·lr_decay) · g / (√Σg² + ε) (torch.optim.Adagrad)",
    ("sum",), torch="Adagrad", warm=({},), bound=bound,
    # torch fills every parameter's sum with the constructor's value, whatever its group sets
    constructor_wide=("initial_accumulator_value",),
)
