"""SGD with momentum: vᵗ = λvᵗ⁻¹ + gᵗ, θᵗ⁺¹ = θᵗ − ηvᵗ (torch's form of the lessons' momentum, docs/math.md)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .base import (
    Bool, Bounds, Float, Hyperparameters, Optimizer, Top, decay_scalars, directed, require_non_negative, zeros,
)
from .kernels import directed_at, finite, guarded


class SGDHyperparameters(Hyperparameters):
    lr: Float = 1e-3
    momentum: Float = 0.0
    dampening: Float = 0.0
    weight_decay: Float = 0.0
    nesterov: Bool = False
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(self, lr="learning rate", momentum="momentum value",
                             weight_decay="weight_decay value")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return self


class SGDState(NamedTuple):
    momentum_buffer: np.ndarray | None = None


def init(param: np.ndarray, hp: SGDHyperparameters) -> SGDState:
    return SGDState(zeros(param) if hp.momentum != 0 else None)


def update(param, grad, state: SGDState, hp: SGDHyperparameters, step: int) -> None:
    grad = directed(param, grad, hp)
    if hp.momentum != 0:
        buf = state.momentum_buffer
        if step == 1:  # torch clones the first gradient into the buffer
            buf[...] = grad
        else:
            buf *= hp.momentum
            buf += (1 - hp.dampening) * grad
        grad = grad + hp.momentum * buf if hp.nesterov else buf
    param -= hp.lr * grad


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    lr: float
    # (0, 1) on the first step (the buffer starts as the gradient), else (momentum, 1 - dampening)
    momentum_now: float = 0.0
    grad_weight: float = 0.0
    momentum: float = 0.0
    nesterov: float = 0.0  # (nesterov, plain): (1, 0) or (0, 1)
    plain: float = 0.0


@kernels.kernel
def _sgd(p, g, p0, sign, wd, decay, lr, momentum_now, grad_weight, momentum, nesterov, plain, top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, lr = f(sign), f(wd), f(decay), f(lr)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        pi = pi - lr * gi
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, gr, pi, pi)
    return bad


@kernels.kernel
def _sgd_momentum(p, g, buf, p0, buf0, sign, wd, decay, lr, momentum_now, grad_weight, momentum, nesterov, plain,
                  top, fill, q):
    f = p.dtype.type  # (a Python literal in the loop would promote the sum to float64)
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, lr, momentum_now = f(sign), f(wd), f(decay), f(lr), f(momentum_now)
    grad_weight, momentum, nesterov, plain = f(grad_weight), f(momentum), f(nesterov), f(plain)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        b = buf0[i] * momentum_now
        b = b + grad_weight * gi
        buf[i] = b
        pi = pi - lr * (nesterov * (gi + momentum * b) + plain * b)
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, b, gr, pi)
    return bad


def scalars(hp: SGDHyperparameters, step: int) -> Scalars:
    if hp.momentum == 0:
        return Scalars(*decay_scalars(hp), hp.lr)
    first = step == 1
    return Scalars(*decay_scalars(hp), hp.lr, 0.0 if first else hp.momentum, 1.0 if first else 1 - hp.dampening,
                   hp.momentum, 1.0 if hp.nesterov else 0.0, 0.0 if hp.nesterov else 1.0)


def fused(param, grad, state: SGDState, hp: SGDHyperparameters, step: int, source=None,
          guard=kernels.UNGUARDED, out=None) -> int:
    return kernels.apply(_sgd_momentum if hp.momentum else _sgd, param, grad, state, source,
                         scalars(hp, step), guard=guard, out=out)


def bound(hp: SGDHyperparameters, step: int, top: Top, g: float, dtype) -> Top:
    """``_sgd``'s and ``_sgd_momentum``'s values, bounded."""
    b = Bounds(dtype)
    sign, wd, decay, lr, momentum_now, grad_weight, momentum, nesterov, plain = b.cast(scalars(hp, step))
    p = b(top.param * decay)
    g = b(sign * g, wd * p)
    if hp.momentum == 0:
        return Top(b(p, b(lr * g)), SGDState(None))
    buf = b(b(top.state.momentum_buffer * momentum_now), b(grad_weight * g))
    d = b(b(nesterov * b(g, b(momentum * buf))), b(plain * buf))
    return Top(b(p, b(lr * d)), SGDState(buf))


sgd = Optimizer(
    "sgd", SGDHyperparameters, init, update, fused, SGDState,
    "θ ← θ − η·v, v ← λ·v + (1−dampening)·g (torch.optim.SGD)",
    torch="SGD", warm=({}, {"momentum": 0.9}), bound=bound,
)
