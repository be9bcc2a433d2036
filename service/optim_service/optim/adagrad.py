"""Adagrad: divide by the root of the sum of all past squared gradients, per parameter."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .base import (
    Bool, Float, Hyperparameters, Optimizer, flat, flat_input, flat_read, read_from, require_non_negative,
    zeros,
)
from .kernels import finite


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
    if hp.maximize:
        grad = -grad
    if hp.weight_decay != 0:
        grad = grad + hp.weight_decay * param
    clr = hp.lr / (1 + (step - 1) * hp.lr_decay)
    state.sum[...] += grad * grad
    std = np.sqrt(state.sum)
    std += hp.eps
    param -= clr * grad / std  # torch's addcdiv order: (value·t1)/t2


class Scalars(NamedTuple):
    clr: float  # lr / (1 + (t − 1)·lr_decay)
    sign: float
    wd: float
    eps: float


@kernels.kernel
def _adagrad(p, g, s, p0, s0, c):
    f = p.dtype.type
    clr, sign, wd, eps = f(c.clr), f(c.sign), f(c.wd), f(c.eps)
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        si = s0[i] + gi * gi
        s[i] = si
        pi = p0[i] - clr * gi / (np.sqrt(si) + eps)
        p[i] = pi
        bad += not finite(pi, si, gr, pi)
    return bad


def fused(param, grad, state: AdagradState, hp: AdagradHyperparameters, step: int, source=None) -> int:
    param0, state0 = read_from(param, state, source)
    clr = hp.lr / (1 + (step - 1) * hp.lr_decay)
    return kernels.run(_adagrad, flat(param), flat_input(grad, param), flat(state.sum),
                       flat_read(param0), flat_read(state0.sum),
                       Scalars(clr, -1.0 if hp.maximize else 1.0, hp.weight_decay, hp.eps))


adagrad = Optimizer(
    "adagrad", AdagradHyperparameters, init, update, fused, AdagradState,
    "θ ← θ − η/(1+(t−1)·lr_decay) · g / (√Σg² + ε) (torch.optim.Adagrad)",
    ("sum",), torch="Adagrad", warm=({},),
    # torch fills every parameter's sum with the constructor's value, whatever its group sets
    constructor_wide=("initial_accumulator_value",),
)
