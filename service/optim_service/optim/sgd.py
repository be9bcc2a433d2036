"""SGD with momentum: vᵗ = λvᵗ⁻¹ + gᵗ, θᵗ⁺¹ = θᵗ − ηvᵗ (torch's form of the lessons' momentum, docs/math.md)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pydantic import model_validator

from . import kernels
from .base import (
    Bool, Float, Hyperparameters, Optimizer, flat, flat_input, flat_read, read_from, require_non_negative,
    zeros,
)


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
    if hp.maximize:
        grad = -grad
    if hp.weight_decay != 0:
        grad = grad + hp.weight_decay * param
    if hp.momentum != 0:
        buf = state.momentum_buffer
        if step == 1:  # torch clones the first gradient into the buffer
            buf[...] = grad
        else:
            buf *= hp.momentum
            buf += (1 - hp.dampening) * grad
        grad = grad + hp.momentum * buf if hp.nesterov else buf
    param -= hp.lr * grad


def fused(param, grad, state: SGDState, hp: SGDHyperparameters, step: int, source=None) -> int:
    param0, state0 = read_from(param, state, source)
    common = (hp.lr, -1.0 if hp.maximize else 1.0, hp.weight_decay)
    if hp.momentum == 0:
        return kernels.run("sgd", flat(param), flat_input(grad, param), flat_read(param0),
                           np.array(common, param.dtype))
    first = step == 1
    return kernels.run("sgd_momentum", flat(param), flat_input(grad, param), flat(state.momentum_buffer),
                       flat_read(param0), flat_read(state0.momentum_buffer), np.array((
                           *common, 0.0 if first else hp.momentum, 1.0 if first else 1 - hp.dampening,
                           hp.momentum, 1.0 if hp.nesterov else 0.0, 0.0 if hp.nesterov else 1.0), param.dtype))


sgd = Optimizer(
    "sgd", SGDHyperparameters, init, update, fused, SGDState,
    "θ ← θ − η·v, v ← λ·v + (1−dampening)·g (torch.optim.SGD)",
)
