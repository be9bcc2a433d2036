"""Rprop (Riedmiller & Braun 1993, torch's form): each weight has its own step size, grown by η₊
while its gradient keeps its sign and shrunk by η₋ when it flips (that step then skips the weight);
only the gradient's sign moves it. For full-batch training: minibatch noise flips signs at random."""

from __future__ import annotations

from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field, model_validator

from .base import Bool, Float, Hyperparameters, Optimizer, reference_step, require_non_negative, zeros

Pair = Annotated[tuple[Float, Float], Field(strict=False)]


class RpropHyperparameters(Hyperparameters):
    lr: Float = Field(1e-2, description="every weight's first step size")
    etas: Pair = Field((0.5, 1.2), description="(η₋, η₊): the factors a step size shrinks and grows by")
    step_sizes: Pair = Field((1e-6, 50.0), description="(min, max) step size")
    maximize: Bool = False

    @model_validator(mode="after")
    def _torch_checks(self):
        require_non_negative(self, lr="learning rate")
        if not 0.0 < self.etas[0] < 1.0 < self.etas[1]:
            raise ValueError(f"Invalid eta values: {self.etas[0]}, {self.etas[1]}")
        return self


class RpropState(NamedTuple):
    prev: np.ndarray
    step_size: np.ndarray


def init(param: np.ndarray, hp: RpropHyperparameters) -> RpropState:
    return RpropState(zeros(param), np.full(param.shape, hp.lr, param.dtype))


def update(param, grad, state: RpropState, hp: RpropHyperparameters, step: int) -> None:
    etaminus, etaplus = hp.etas
    if hp.maximize:
        grad = -grad
    factor = np.sign(grad * state.prev)
    factor[factor > 0] = etaplus
    factor[factor < 0] = etaminus
    factor[factor == 0] = 1
    state.step_size[...] *= factor
    np.clip(state.step_size, *hp.step_sizes, out=state.step_size)
    grad = grad.copy()
    grad[factor == etaminus] = 0  # the sign flipped: this step leaves the weight, and the next grows nothing
    param -= np.sign(grad) * state.step_size
    state.prev[...] = grad


rprop = Optimizer(
    "rprop", RpropHyperparameters, init, update, reference_step(update), RpropState,
    "step ← clamp(step·η±) by sign agreement, θ ← θ − sign(g)·step (torch.optim.Rprop)",
    torch="Rprop",
)
