"""Yogi (Zaheer et al., NeurIPS 2018; the server optimizer of FedYogi, Reddi et al., ICLR 2021):
Adam whose second moment moves additively, by at most (1−β₂)·g² a step, towards g²:

    m ← β₁m + (1−β₁)g
    v ← v − (1−β₂)·g²·sign(v − g²)
    θ ← θ − η/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)      (Adam's update and bias correction, as torch's)

v starts at ``initial_accumulator_value`` (1e-6, as TensorFlow Federated's Yogi), so that an early
v − g² has a sign. ε defaults to 1e-3 (the papers' τ). Not in torch.optim: this numpy code is its
definition, and tests hold the update to a transcription of the formula above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from pydantic import model_validator

from .adam import Betas
from .base import Bool, Float, Hyperparameters, Optimizer, directed, lerp_, reference_step, require_non_negative


class YogiHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    betas: Betas = (0.9, 0.999)
    eps: Float = 1e-3
    initial_accumulator_value: Float = 1e-6
    weight_decay: Float = 0.0
    maximize: Bool = False

    @model_validator(mode="after")
    def _checks(self):
        require_non_negative(self, lr="learning rate", eps="epsilon value",
                             initial_accumulator_value="initial_accumulator_value", weight_decay="weight_decay value")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        return self


class YogiState(NamedTuple):
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray


def init(param: np.ndarray, hp: YogiHyperparameters) -> YogiState:
    return YogiState(np.zeros(param.shape, param.dtype), np.full(param.shape, hp.initial_accumulator_value, param.dtype))


def update(param, grad, state: YogiState, hp: YogiHyperparameters, step: int) -> None:
    beta1, beta2 = hp.betas
    grad = directed(param, grad, hp)
    lerp_(state.exp_avg, grad, 1 - beta1)
    square = grad * grad
    state.exp_avg_sq[...] -= (1 - beta2) * square * np.sign(state.exp_avg_sq - square)
    denom = np.sqrt(state.exp_avg_sq)
    denom /= math.sqrt(1 - beta2**step)
    denom += hp.eps
    param -= hp.lr / (1 - beta1**step) * state.exp_avg / denom


yogi = Optimizer(
    "yogi", YogiHyperparameters, init, update, reference_step(update), YogiState,
    "v ← v − (1−β₂)g²·sign(v − g²), m and the update as Adam's (Zaheer et al. 2018; FedYogi)",
    ("exp_avg_sq",),
)
