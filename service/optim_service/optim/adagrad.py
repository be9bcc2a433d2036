"""Adagrad: divide by the root of the sum of all past squared gradients, per parameter."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pydantic import model_validator

from .base import Bool, Float, Hyperparameters, Optimizer


class AdagradHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    lr_decay: Float = 0.0
    weight_decay: Float = 0.0
    initial_accumulator_value: Float = 0.0
    eps: Float = 1e-10
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        if not 0.0 <= self.lr:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if not 0.0 <= self.lr_decay:
            raise ValueError(f"Invalid lr_decay value: {self.lr_decay}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay}")
        if not 0.0 <= self.initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {self.initial_accumulator_value}"
            )
        if not 0.0 <= self.eps:
            raise ValueError(f"Invalid epsilon value: {self.eps}")
        return self


class AdagradState(NamedTuple):
    sum: np.ndarray


def init(param: np.ndarray, hp: AdagradHyperparameters) -> AdagradState:
    return AdagradState(np.full_like(param, hp.initial_accumulator_value))


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


adagrad = Optimizer(
    "adagrad", AdagradHyperparameters, init, update, AdagradState,
    "θ ← θ − η/(1+(t−1)·lr_decay) · g / (√Σg² + ε) (torch.optim.Adagrad)",
)
