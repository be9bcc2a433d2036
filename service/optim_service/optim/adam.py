"""Adam: momentum + RMSProp + bias correction; AdamW is the same update with decoupled weight decay."""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import numpy as np
from numba import prange
from pydantic import Field, model_validator

from . import kernels
from .base import (
    Bool, Bounds, Float, Hyperparameters, Optimizer, Top, Unproven, decay_scalars, directed, lerp_,
    require_non_negative, zeros,
)
from .kernels import directed_at, finite, guarded, moments_at

Betas = Annotated[tuple[Float, Float], Field(strict=False)]  # a JSON list of two numbers


class BetasChecked(Hyperparameters):
    """The Adam family's hyperparameters and torch's checks of them, in torch's order and words."""

    lr: Float = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: Float = 1e-8
    weight_decay: Float = 0.0

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(self, lr="learning rate", eps="epsilon value")
        if not 0.0 <= self.betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {self.betas[0]}")
        if not 0.0 <= self.betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {self.betas[1]}")
        require_non_negative(self, weight_decay="weight_decay value")
        return self


class AdamHyperparameters(BetasChecked):
    amsgrad: Bool = False
    maximize: Bool = False
    decoupled_weight_decay: Bool = False


class AdamWHyperparameters(AdamHyperparameters):
    """torch.optim.AdamW: Adam with ``decoupled_weight_decay`` fixed on and a default decay of 1e-2."""

    weight_decay: Float = 1e-2
    decoupled_weight_decay: Annotated[Bool, Field(exclude=True)] = True

    @model_validator(mode="after")
    def _always_decoupled(self):
        if not self.decoupled_weight_decay:
            raise ValueError("adamw always decouples weight decay; use adam for the coupled form")
        return self


class AdamState(NamedTuple):
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    max_exp_avg_sq: np.ndarray | None = None


def init(param: np.ndarray, hp: AdamHyperparameters) -> AdamState:
    return AdamState(
        zeros(param),
        zeros(param),
        zeros(param) if hp.amsgrad else None,
    )


def moments_(state, grad: np.ndarray, beta1: float, beta2: float) -> None:
    """Adam's first and second moments, in place: ``exp_avg`` lerps to g, ``exp_avg_sq`` to g²."""
    lerp_(state.exp_avg, grad, 1 - beta1)
    state.exp_avg_sq[...] *= beta2
    state.exp_avg_sq[...] += (1 - beta2) * grad * grad


def update(param, grad, state: AdamState, hp: AdamHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    grad = directed(param, grad, hp)
    moments_(state, grad, beta1, beta2)
    step_size = hp.lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    second = state.exp_avg_sq
    if hp.amsgrad:
        np.maximum(state.max_exp_avg_sq, state.exp_avg_sq, out=state.max_exp_avg_sq)
        second = state.max_exp_avg_sq
    denom = np.sqrt(second)
    denom /= bias_correction2_sqrt
    denom += hp.eps
    param -= step_size * state.exp_avg / denom


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    b1_c: float  # 1 − β₁: torch's lerp for a weight below 0.5
    b2: float
    b2_c: float
    eps: float
    step_size: float  # lr / (1 − β₁ᵗ)
    bc2_sqrt: float  # √(1 − β₂ᵗ)


@kernels.kernel
def _adam(p, g, m, v, p0, m0, v0, sign, wd, decay, b1_c, b2, b2_c, eps, step_size, bc2_sqrt, top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, b1_c, b2 = f(sign), f(wd), f(decay), f(b1_c), f(b2)
    b2_c, eps, step_size, bc2_sqrt = f(b2_c), f(eps), f(step_size), f(bc2_sqrt)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        mi, vi = moments_at(m, v, m0, v0, i, gi, b1_c, b2, b2_c)
        pi = pi - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, mi, vi, gr)
    return bad


@kernels.kernel
def _adam_amsgrad(p, g, m, v, vmax, p0, m0, v0, vmax0, sign, wd, decay, b1_c, b2, b2_c, eps, step_size, bc2_sqrt,
                  top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, b1_c, b2 = f(sign), f(wd), f(decay), f(b1_c), f(b2)
    b2_c, eps, step_size, bc2_sqrt = f(b2_c), f(eps), f(step_size), f(bc2_sqrt)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        mi, vi = moments_at(m, v, m0, v0, i, gi, b1_c, b2, b2_c)
        second = max(vmax0[i], vi)
        vmax[i] = second
        pi = pi - step_size * mi / (np.sqrt(second) / bc2_sqrt + eps)
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, mi, second, gr)
    return bad


def scalars(hp: AdamHyperparameters, step: int) -> Scalars:
    beta1, beta2 = hp.betas
    return Scalars(*decay_scalars(hp), 1 - beta1, beta2, 1 - beta2, hp.eps, hp.lr / (1 - beta1**step),
                   math.sqrt(1 - beta2**step))


@kernels.torch_lerp(update)
def fused(param, grad, state: AdamState, hp: AdamHyperparameters, step: int, source=None,
          guard=kernels.UNGUARDED, out=None) -> int:
    return kernels.apply(_adam_amsgrad if hp.amsgrad else _adam, param, grad, state, source,
                         scalars(hp, step), guard=guard, out=out)


def bound(hp: AdamHyperparameters, step: int, top: Top, g: float, dtype) -> Top:
    """``_adam``'s values, bounded: a lerp stays between its ends, the denominator is at least ε."""
    b = Bounds(dtype)
    sign, wd, decay, b1_c, b2, b2_c, eps, step_size, bc2_sqrt = b.cast(scalars(hp, step))
    if b1_c >= 0.5:  # torch's other lerp formula: the numpy reference (kernels.torch_lerp)
        raise Unproven
    b.positive(eps, bc2_sqrt)
    p = b(top.param * decay)
    g = b(sign * g, wd * p)
    m = b(max(top.state.exp_avg, g))
    b(g, top.state.exp_avg)  # g − m₀
    v = b(b2 * top.state.exp_avg_sq, b2_c * b(g * g))
    second = v if top.state.max_exp_avg_sq is None else b(max(top.state.max_exp_avg_sq, v))
    b(math.sqrt(second) / bc2_sqrt, eps)
    return Top(b(p, b(b(step_size * m) / eps)), AdamState(m, v, None if top.state.max_exp_avg_sq is None else second))


adam = Optimizer(
    "adam", AdamHyperparameters, init, update, fused, AdamState,
    "m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − η·m̂/(√v̂ + ε) (torch.optim.Adam)",
    ("exp_avg_sq", "max_exp_avg_sq"), torch="Adam", warm=({}, {"amsgrad": True}), bound=bound,
)
adamw = adam._replace(
    name="adamw", hyperparameters=AdamWHyperparameters, torch="AdamW", warm=(),
    summary="Adam with decoupled weight decay θ ← θ(1 − η·λ) (torch.optim.AdamW)",
)
