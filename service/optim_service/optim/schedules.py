"""Learning-rate schedules, evaluated per optimizer step in closed form.

Each is a pydantic model with torch's argument names and a ``factor(base_lr, t)`` giving the learning
rate of the (t+1)-th optimizer step, i.e. after the torch scheduler has been stepped ``t`` times.
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from .base import Bool, Float

Int = Annotated[int, Strict()]


class ScheduleOverflow(ArithmeticError):
    """A schedule whose learning rate at some step is no finite number (``exponential`` with a
    large gamma, say): that step is refused, naming both."""


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def overrides(self, hp, t: int, lr_scale: float = 1.0) -> dict:
        """The hyperparameters this schedule sets for the (t+1)-th step: the learning rate, and for
        schedules that cycle it, momentum (or Adam's beta1)."""
        return {"lr": self.lr_at(hp.lr, t) * lr_scale}

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


class CosineWarmRestarts(_Schedule):
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts: cosine annealing restarted every T_i
    steps, T_0 first, each cycle T_mult times the last."""

    type: Literal["cosine_warm_restarts"]
    T_0: Annotated[Int, Field(ge=1)]
    T_mult: Annotated[Int, Field(ge=1)] = 1
    eta_min: Float = 0.0

    def lr(self, base_lr: float, t: int) -> float:
        t_cur, t_i = t, self.T_0
        if self.T_mult == 1:
            t_cur = t % self.T_0
        else:
            while t_cur >= t_i:  # whole cycles, as torch's own step() counts them
                t_cur -= t_i
                t_i *= self.T_mult
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


class OneCycle(_Schedule):
    """torch.optim.lr_scheduler.OneCycleLR: from max_lr/div_factor up to max_lr over pct_start of
    total_steps, then down to initial/final_div_factor; momentum (Adam's beta1) the other way,
    between max_momentum and base_momentum. The optimizer's own lr is not used, as in torch."""

    type: Literal["onecycle"]
    max_lr: Annotated[Float, Field(gt=0)]
    total_steps: Annotated[Int, Field(ge=2)]
    pct_start: Annotated[Float, Field(gt=0, lt=1)] = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: Bool = True
    base_momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.85
    max_momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.95
    div_factor: Annotated[Float, Field(gt=0)] = 25.0
    final_div_factor: Annotated[Float, Field(gt=0)] = 1e4
    three_phase: Bool = False

    def _phases(self):
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        end = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return [(end, initial, self.max_lr, self.max_momentum, self.base_momentum),
                    (float(2 * self.pct_start * self.total_steps) - 2, self.max_lr, initial,
                     self.base_momentum, self.max_momentum),
                    (self.total_steps - 1, initial, final, self.max_momentum, self.max_momentum)]
        return [(end, initial, self.max_lr, self.max_momentum, self.base_momentum),
                (self.total_steps - 1, self.max_lr, final, self.base_momentum, self.max_momentum)]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _at(self, t: int) -> tuple[float, float]:
        if t >= self.total_steps:
            raise ScheduleOverflow(f"schedule 'onecycle' ran its total_steps ({self.total_steps}); step {t + 1} "
                                   "is past its end")
        start = 0.0
        for end, lr0, lr1, m0, m1 in self._phases():
            if t <= end or end == self._phases()[-1][0]:
                pct = (t - start) / (end - start)
                return self._anneal(lr0, lr1, pct), self._anneal(m0, m1, pct)
            start = end
        raise AssertionError("unreachable")

    def lr(self, base_lr: float, t: int) -> float:
        return self._at(t)[0]

    def overrides(self, hp, t: int, lr_scale: float = 1.0) -> dict:
        lr, momentum = self._at(t)
        out = {"lr": self.lr_at(hp.lr, t) * lr_scale}
        if self.cycle_momentum:
            if "betas" in type(hp).model_fields:
                out["betas"] = (momentum, hp.betas[1])
            else:
                out["momentum"] = momentum
        return out


class LrRangeTest(_Schedule):
    """The learning-rate range test (fastai's lr_find, Lightning's lr_finder): lr grows
    exponentially from start_lr to end_lr over num_steps steps, lrᵢ = start·(end/start)^(i/(n−1)),
    then the test is over; the diagnosis suggests an lr from the loss it recorded."""

    type: Literal["lr_range_test"]
    start_lr: Annotated[Float, Field(gt=0)] = 1e-7
    end_lr: Annotated[Float, Field(gt=0)] = 10.0
    num_steps: Annotated[Int, Field(ge=2, le=100_000)] = 100

    def lr(self, base_lr: float, t: int) -> float:
        if t >= self.num_steps:
            raise ScheduleOverflow(f"schedule 'lr_range_test' ran its {self.num_steps} steps; GET .../diagnosis "
                                   "suggests a learning rate from them")
        return self.start_lr * (self.end_lr / self.start_lr) ** (t / (self.num_steps - 1))


class ReduceOnPlateau(_Schedule):
    """torch.optim.lr_scheduler.ReduceLROnPlateau, fed the loss sent with each step (a step without a
    loss leaves it be): after ``patience`` steps without improving on the best loss by ``threshold``,
    every group's lr is multiplied by ``factor`` (down to ``min_lr``), then ``cooldown`` steps pass
    before it counts again. Its state lives with the session; the lr it sets applies from the next
    step, as a torch scheduler stepped after ``optimizer.step()``."""

    type: Literal["reduce_on_plateau"]
    mode: Literal["min", "max"] = "min"
    factor: Annotated[Float, Field(gt=0, lt=1)] = 0.1
    patience: Annotated[Int, Field(ge=0)] = 10
    threshold: Annotated[Float, Field(ge=0)] = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: Annotated[Int, Field(ge=0)] = 0
    min_lr: Annotated[Float, Field(ge=0)] | list[Annotated[Float, Field(ge=0)]] = 0.0
    eps: Annotated[Float, Field(ge=0)] = 1e-8

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr  # the state's lrs are what apply (``lr_of``)

    def start(self, lrs: list[float]) -> dict:
        if isinstance(self.min_lr, list) and len(self.min_lr) != len(lrs):
            raise ValueError(f"expected {len(lrs)} min_lrs, got {len(self.min_lr)}")
        return {"best": None, "num_bad_epochs": 0, "cooldown_counter": 0, "last_epoch": 0, "lrs": list(lrs)}

    def _better(self, current: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return current < (best * (1 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return current > (best * (self.threshold + 1) if self.threshold_mode == "rel" else best + self.threshold)

    def after(self, state: dict, loss: float) -> dict:
        """The state after a step that reported ``loss`` (torch's ``step(metrics)``), as a new dict."""
        state = dict(state, lrs=list(state["lrs"]), last_epoch=state["last_epoch"] + 1)
        if self._better(loss, state["best"]):
            state["best"], state["num_bad_epochs"] = loss, 0
        else:
            state["num_bad_epochs"] += 1
        if state["cooldown_counter"] > 0:
            state["cooldown_counter"] -= 1
            state["num_bad_epochs"] = 0
        if state["num_bad_epochs"] > self.patience:
            floors = self.min_lr if isinstance(self.min_lr, list) else [self.min_lr] * len(state["lrs"])
            for i, (old, floor) in enumerate(zip(state["lrs"], floors)):
                new = max(old * self.factor, floor)
                if old - new > self.eps:
                    state["lrs"][i] = new
            state["cooldown_counter"], state["num_bad_epochs"] = self.cooldown, 0
        return state


Closed = Annotated[Union[InverseSqrt, Step, Exponential, Cosine, MultiStep, Linear, CosineWarmRestarts],
                   Field(discriminator="type")]


class Sequential(_Schedule):
    """torch.optim.lr_scheduler.SequentialLR: ``schedules[i]`` from ``milestones[i-1]`` on, each
    counting its own steps from there (a linear warmup, then cosine, say)."""

    type: Literal["sequential"]
    schedules: Annotated[list[Closed], Field(min_length=2, max_length=16)]
    milestones: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=1, max_length=15)]

    @model_validator(mode="after")
    def _one_milestone_between_two(self):
        if len(self.milestones) != len(self.schedules) - 1:
            raise ValueError(f"Sequential Schedulers expects number of schedulers provided to be one more than the "
                             f"number of milestone points, but got number of schedulers {len(self.schedules)} and the "
                             f"number of milestones to be equal to {len(self.milestones)}")
        if sorted(self.milestones) != self.milestones or len(set(self.milestones)) != len(self.milestones):
            raise ValueError("milestones must increase")
        return self

    def lr(self, base_lr: float, t: int) -> float:
        i = bisect.bisect_right(self.milestones, t)
        return self.schedules[i].lr(base_lr, t - (self.milestones[i - 1] if i else 0))


Schedule = Annotated[
    Union[InverseSqrt, Step, Exponential, Cosine, MultiStep, Linear, CosineWarmRestarts, OneCycle, LrRangeTest,
          Sequential, ReduceOnPlateau],
    Field(discriminator="type"),
]
