"""How a session combines what several workers send: each step as it comes, synchronous rounds, or
asynchronous steps scaled by their staleness. Outside the algorithms, like clipping and schedules:
a round's mean is one ordinary step.

- ``each`` (the default): every POSTed gradient is its own step (MXNet KVStore's ``dist_async``).
- ``sync``: a round collects ``contributions`` (K) gradients, then steps once on their mean
  (``weighted``: weighted by each contribution's ``weight``, its number of examples say), or after
  ``round_timeout_seconds`` from its first contribution once ``min_contributions`` have come
  (``dist_sync``; Flower's server strategies; DiLoCo's outer step on pseudo-gradients).
- ``async``: a gradient states the step it was computed on (``base_step``); its staleness
  τ = step − base_step, and a push staler than ``max_staleness`` is refused (SSP), else applied with
  the learning rate scaled by s(τ) (FedAsync's staleness functions, as APPFL defines them).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from .base import Float

Int = Annotated[int, Strict()]


class _Mode(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Each(_Mode):
    mode: Literal["each"] = "each"


class Sync(_Mode):
    mode: Literal["sync"]
    contributions: Annotated[Int, Field(ge=1, le=100_000, description="K: a round commits when K have arrived")]
    weighting: Literal["mean", "weighted"] = "mean"
    min_contributions: Annotated[Int, Field(ge=1, description="M (default K): a timed-out round commits with M")] | None = None
    round_timeout_seconds: Annotated[Float, Field(gt=0, le=7 * 24 * 3600)] | None = None

    @model_validator(mode="after")
    def _fewer_than_k(self):
        if self.min_contributions is not None and self.min_contributions > self.contributions:
            raise ValueError(f"min_contributions ({self.min_contributions}) cannot exceed contributions "
                             f"({self.contributions})")
        return self

    @property
    def needed_at_timeout(self) -> int:
        return self.min_contributions or self.contributions


class StalenessScale(_Mode):
    """s(τ): constant 1; inverse 1/(1+τ); polynomial (1+τ)^(−a); hinge 1 if τ ≤ b else 1/(a(τ−b)+1)."""

    type: Literal["constant", "inverse", "polynomial", "hinge"] = "constant"
    a: Annotated[Float, Field(ge=0)] = 0.5
    b: Annotated[Float, Field(ge=0)] = 4.0

    def __call__(self, tau: int) -> float:
        if self.type == "inverse":
            return 1.0 / (1 + tau)
        if self.type == "polynomial":
            return math.pow(1 + tau, -self.a)
        if self.type == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1)
        return 1.0


class Async(_Mode):
    mode: Literal["async"]
    max_staleness: Annotated[Int, Field(ge=0, description="S: a push more than S steps stale is refused (409)")]
    staleness_scale: StalenessScale = StalenessScale()


Aggregation = Annotated[Union[Each, Sync, Async], Field(discriminator="mode")]
