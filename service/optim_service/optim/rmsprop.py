"""RMSProp: divide by a root-mean-square of gradients with exponential weights α and 1−α.

``square_avg_init="first_grad"`` is the gradient-descent lessons' form (docs/math.md), σ⁰ = |g⁰|: the first step sets the
average to g² instead of mixing it with zero (torch's form, ``"zero"``, the default).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from numba import prange
from pydantic import model_validator

from . import kernels
from .base import (
    Bool, Bounds, Float, Hyperparameters, Optimizer, Top, Unproven, decay_scalars, directed, lerp_, reference,
    require_non_negative, zeros,
)
from .kernels import directed_at, ema_sq, finite, guarded


class RMSpropHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    alpha: Float = 0.99
    eps: Float = 1e-8
    weight_decay: Float = 0.0
    momentum: Float = 0.0
    centered: Bool = False
    maximize: Bool = False
    square_avg_init: Literal["zero", "first_grad"] = "zero"

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(
            self, lr="learning rate", eps="epsilon value", momentum="momentum value",
            weight_decay="weight_decay value", alpha="alpha value",
        )
        return self


class RMSpropState(NamedTuple):
    square_avg: np.ndarray
    momentum_buffer: np.ndarray | None = None
    grad_avg: np.ndarray | None = None


def init(param: np.ndarray, hp: RMSpropHyperparameters) -> RMSpropState:
    return RMSpropState(
        zeros(param),
        zeros(param) if hp.momentum > 0 else None,
        zeros(param) if hp.centered else None,
    )


def update(param, grad, state: RMSpropState, hp: RMSpropHyperparameters, step: int) -> None:
    grad = directed(param, grad, hp)
    square_avg = state.square_avg
    if step == 1 and hp.square_avg_init == "first_grad":
        square_avg[...] = grad * grad
    else:
        square_avg *= hp.alpha
        square_avg += (1 - hp.alpha) * grad * grad
    if hp.centered:
        lerp_(state.grad_avg, grad, 1 - hp.alpha)
        avg = np.sqrt(square_avg - state.grad_avg * state.grad_avg)
    else:
        avg = np.sqrt(square_avg)
    avg += hp.eps
    if hp.momentum > 0:
        buf = state.momentum_buffer
        buf *= hp.momentum
        buf += grad / avg
        param -= hp.lr * buf
    else:
        param -= hp.lr * grad / avg


class Scalars(NamedTuple):
    sign: float  # (sign, wd, decay): base.decay_scalars
    wd: float
    decay: float
    lr: float
    alpha: float  # (alpha, alpha_c) = (0, 1) on the lessons' form's first step (σ⁰ = |g⁰|), else (α, 1 − α)
    alpha_c: float
    eps: float
    momentum: float = 0.0


@kernels.kernel
def _rmsprop(p, g, sq, p0, sq0, sign, wd, decay, lr, alpha, alpha_c, eps, momentum, top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, lr, alpha, alpha_c, eps = (f(sign), f(wd), f(decay), f(lr), f(alpha),
                                                f(alpha_c), f(eps))
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        v = ema_sq(sq0[i], gi, alpha, alpha_c)
        sq[i] = v
        pi = pi - lr * gi / (np.sqrt(v) + eps)
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, v, gr, pi)
    return bad


@kernels.kernel
def _rmsprop_momentum(p, g, sq, buf, p0, sq0, buf0, sign, wd, decay, lr, alpha, alpha_c, eps, momentum,
                      top, fill, q):
    f = p.dtype.type
    top, fill = f(top), f(fill)  # kernels.guarded
    sign, wd, decay, lr, alpha, alpha_c, eps = (f(sign), f(wd), f(decay), f(lr), f(alpha),
                                                f(alpha_c), f(eps))
    momentum = f(momentum)
    bad = 0
    for i in prange(p.size):
        gr = guarded(g[i], top, fill)
        gi, pi = directed_at(gr, p0[i], sign, wd, decay)
        v = ema_sq(sq0[i], gi, alpha, alpha_c)
        sq[i] = v
        b = buf0[i] * momentum
        b = b + gi / (np.sqrt(v) + eps)
        buf[i] = b
        pi = pi - lr * b
        p[i] = pi
        q[i] = pi  # (p itself, or where the step's answer goes)
        bad += not finite(pi, v, b, gr)
    return bad


def scalars(hp: RMSpropHyperparameters, step: int) -> Scalars:
    first_grad = step == 1 and hp.square_avg_init == "first_grad"
    return Scalars(*decay_scalars(hp), hp.lr, 0.0 if first_grad else hp.alpha, 1.0 if first_grad else 1 - hp.alpha,
                   hp.eps, hp.momentum)


def fused(param, grad, state: RMSpropState, hp: RMSpropHyperparameters, step: int, source=None,
          guard=kernels.UNGUARDED, out=None) -> int:
    if hp.centered:  # no kernel: the reference, and its own finiteness count
        return reference(update, param, grad, state, hp, step, source)
    return kernels.apply(_rmsprop_momentum if hp.momentum > 0 else _rmsprop, param, grad, state, source,
                         scalars(hp, step), guard=guard, out=out)


def bound(hp: RMSpropHyperparameters, step: int, top: Top, g: float, dtype) -> Top:
    """``_rmsprop``'s and ``_rmsprop_momentum``'s values, bounded: σ² holds (1 − α)·g², so
    |g|/(σ + ε) ≤ 1/√(1 − α) (``Bounds.ratio``).
    Centered is unproven: √(σ² − ḡ²) may round below 0."""
    if hp.centered:
        raise Unproven
    b = Bounds(dtype)
    sign, wd, decay, lr, alpha, alpha_c, eps, momentum = b.cast(scalars(hp, step))
    b.positive(eps)
    p = b(top.param * decay)
    g = b(sign * g, wd * p)
    v = b(alpha * top.state.square_avg, alpha_c * b(g * g))
    b(math.sqrt(v), eps)
    scaled = b.ratio(g, eps, alpha_c)
    if hp.momentum > 0:
        buf = b(b(top.state.momentum_buffer * momentum), scaled)
        return Top(b(p, b(lr * buf)), RMSpropState(v, buf, None))
    b(lr * g)
    return Top(b(p, b(lr * scaled)), RMSpropState(v, None, None))


rmsprop = Optimizer(
    "rmsprop", RMSpropHyperparameters, init, update, fused, RMSpropState,
    "σ² ← α·σ² + (1−α)·g², θ ← θ − η·g/(σ + ε) (torch.optim.RMSprop; the lessons' form σ⁰=|g⁰|)",
    ("square_avg",), torch="RMSprop", warm=({}, {"momentum": 0.9}), bound=bound,
)
