"""Adafactor (Shazeer & Stern 2018, torch's form): Adam-like scaling from a factored second moment.
For a matrix (or each matrix of a stack, the last two dimensions) it keeps one running mean of g²
per row and one per column, m + n numbers for m×n, and estimates the full matrix as their outer
product over the mean of the rows; a vector keeps its own. No first moment. The step is relative:
lr is capped at 1/√t and multiplied by the parameter's RMS, and an update whose RMS exceeds d is
scaled down to it.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field, model_validator

from .base import (
    COLUMN, ROW, Bool, Float, Hyperparameters, Optimizer, lerp_, reference_step, zeros,
)

Eps = Annotated[tuple[Float | None, Float], Field(strict=False)]


class AdafactorHyperparameters(Hyperparameters):
    lr: Float = 1e-2
    beta2_decay: Float = Field(-0.8, description="the second moment's weight of a new g² is t^beta2_decay")
    eps: Eps = Field((None, 1e-3), description="(ε₁, ε₂): ε₁ floors the second moment (null: the dtype's "
                     "machine epsilon), ε₂ the parameter RMS the step is relative to")
    d: Float = Field(1.0, description="the update's RMS is clipped to d")
    weight_decay: Float = 0.0
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):  # torch's words, which differ from the other optimizers'
        if not 0.0 <= self.lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {self.lr}")
        if not 0.0 >= self.beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {self.beta2_decay}")
        if self.eps[0] is not None and not 0.0 <= self.eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {self.eps[0]}")
        if not 0.0 <= self.eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {self.eps[1]}")
        if not 1.0 <= self.d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {self.d}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {self.weight_decay}")
        return self


class AdafactorState(NamedTuple):
    row_var: np.ndarray | None = None  # shape (..., m, 1): a matrix's factors
    col_var: np.ndarray | None = None  # shape (..., 1, n)
    variance: np.ndarray | None = None  # a vector's (or a scalar's) own


def init(param: np.ndarray, hp: AdafactorHyperparameters) -> AdafactorState:
    if param.ndim > 1:
        return AdafactorState(np.zeros((*param.shape[:-1], 1), param.dtype),
                              np.zeros((*param.shape[:-2], 1, param.shape[-1]), param.dtype))
    return AdafactorState(variance=zeros(param))


def _norm(x: np.ndarray, **axis) -> np.ndarray | float:
    return np.sqrt(np.sum(x * x, **axis))


def update(param, grad, state: AdafactorState, hp: AdafactorHyperparameters, step: int) -> None:
    if hp.maximize:
        grad = -grad
    eps1 = hp.eps[0] if hp.eps[0] is not None else float(np.finfo(param.dtype).eps)
    one_minus_beta2_t = float(step) ** hp.beta2_decay
    rho_t = min(hp.lr, 1 / (float(step) ** 0.5))
    alpha = max(hp.eps[1], float(_norm(param)) / (param.size ** 0.5)) * rho_t
    if hp.weight_decay != 0:
        param *= 1 - hp.lr * hp.weight_decay
    if grad.ndim > 1:
        row_mean = _norm(grad, axis=-1, keepdims=True) ** 2 / grad.shape[-1]
        lerp_(state.row_var, row_mean, one_minus_beta2_t)
        col_mean = _norm(grad, axis=-2, keepdims=True) ** 2 / grad.shape[-2]
        lerp_(state.col_var, col_mean, one_minus_beta2_t)
        estimate = state.row_var @ state.col_var
        estimate /= np.maximum(state.row_var.mean(axis=-2, keepdims=True), eps1)
    else:
        lerp_(state.variance, grad * grad, one_minus_beta2_t)
        estimate = state.variance.copy()
    change = 1 / np.sqrt(np.maximum(estimate, eps1 * eps1))
    change *= grad
    denom = max(1.0, float(_norm(change)) / ((change.size ** 0.5) * hp.d))
    param -= alpha / denom * change


adafactor = Optimizer(
    "adafactor", AdafactorHyperparameters, init, update, reference_step(update), AdafactorState,
    "v̂ ≈ row·col / mean(row) (m + n numbers for m×n), θ ← θ − min(η, 1/√t)·RMS(θ)·g/√v̂, update RMS ≤ d "
    "(torch.optim.Adafactor)",
    ("row_var", "col_var", "variance"), shapes={"row_var": ROW, "col_var": COLUMN}, torch="Adafactor",
    elementwise=False,
)
