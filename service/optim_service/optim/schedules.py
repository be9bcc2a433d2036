"""Learning-rate schedules, evaluated per optimizer step in closed form.

Each is a pydantic model with torch's argument names and a ``factor(base_lr, t)`` giving the learning
rate of the (t+1)-th optimizer step, i.e. after the torch scheduler has been stepped ``t`` times.
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from .base import Float

Int = Annotated[int, Strict()]


class ScheduleOverflow(ArithmeticError):
    """A schedule whose learning rate at some step is no finite number (``exponential`` with a
    large gamma, say): that step is refused, naming both."""


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def lr_at(self, base_lr: float, t: int) -> float:
        """``lr(base_lr, t)``, or ``ScheduleOverflow`` when that is no finite number."""
        try:
            lr = self.lr(base_lr, t)
        except (OverflowError, ZeroDivisionError):  # Python's float ** raises where numpy gives inf
            lr = math.inf
        if not math.isfinite(lr):
            raise ScheduleOverflow(
                f"schedule '{self.type}' gives no finite learning rate for step {t + 1} (from lr {base_lr!r})")
        return lr


class InverseSqrt(_Schedule):
    """Time decay ηᵗ = η / √(t+1), as the gradient-descent lessons write it (docs/math.md)."""

    type: Literal["inverse_sqrt"]

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr / math.sqrt(t + 1)


class Step(_Schedule):
    """torch.optim.lr_scheduler.StepLR."""

    type: Literal["step"]
    step_size: Annotated[Int, Field(ge=1)]
    gamma: Float = 0.1

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** (t // self.step_size)


class Exponential(_Schedule):
    """torch.optim.lr_scheduler.ExponentialLR."""

    type: Literal["exponential"]
    gamma: Float

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma**t


class Cosine(_Schedule):
    """torch.optim.lr_scheduler.CosineAnnealingLR."""

    type: Literal["cosine"]
    T_max: Annotated[Int, Field(ge=1)]
    eta_min: Float = 0.0

    def lr(self, base_lr: float, t: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class MultiStep(_Schedule):
    """torch.optim.lr_scheduler.MultiStepLR."""

    type: Literal["multistep"]
    milestones: Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1, max_length=10_000)]
    gamma: Float = 0.1

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** bisect.bisect_right(sorted(self.milestones), t)


class Linear(_Schedule):
    """torch.optim.lr_scheduler.LinearLR."""

    type: Literal["linear"]
    start_factor: Float = 1.0 / 3
    end_factor: Float = 1.0
    total_iters: Annotated[Int, Field(ge=1)] = 5

    @model_validator(mode="after")
    def _torch_checks(self):
        if self.start_factor > 1.0 or self.start_factor <= 0:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
            )
        if self.end_factor > 1.0 or self.end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        return self

    def lr(self, base_lr: float, t: int) -> float:
        progress = min(t, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * progress)


Schedule = Annotated[
    Union[InverseSqrt, Step, Exponential, Cosine, MultiStep, Linear], Field(discriminator="type")
]
