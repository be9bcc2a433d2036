"""A synchronous round in progress, as the store keeps it (``RoundRecord``): the weighted sum of its
contributions so far, laid out as the session's parameters, and their bookkeeping. A contribution
adds to the sum (one pass over its tensors, not a copy of the session); the contribution that
completes the round steps on sum / total weight instead, and the round goes with that step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import orjson

from .optim.aggregation import Sync
from .store import RoundRecord


class Contribution(NamedTuple):
    """What a push says of itself besides its gradients."""

    worker: str | None = None
    weight: float = 1.0
    round: int | None = None  # the round it was computed for
    base_step: int | None = None  # the step whose parameters it was computed on (async)


class RoundStatus(NamedTuple):
    round: int
    received: int
    needed: int
    workers: list[str]
    opened_at: float | None
    deadline: float | None

    def document(self) -> dict:
        return {"round": self.round, "received": self.received, "needed": self.needed, "workers": self.workers,
                "opened_at": self.opened_at, "deadline": self.deadline}


@dataclass
class Round:
    number: int  # round r commits as step r + 1
    opened_at: float
    deadline: float | None
    version: int = 0  # the stored round's version (0: none stored yet)
    workers: list[str] = field(default_factory=list)
    weight: float = 0.0  # the contributions' total weight
    loss_sum: float = 0.0
    losses: int = 0
    sum: np.ndarray | None = None  # flat, the session's dtype; None before the first contribution

    @classmethod
    def open(cls, number: int, config: Sync, now: float | None = None) -> Round:
        now = time.time() if now is None else now
        deadline = now + config.round_timeout_seconds if config.round_timeout_seconds else None
        return cls(number, now, deadline)

    @classmethod
    def current(cls, stored: RoundRecord | None, number: int, config: Sync, dtype: np.dtype,
                now: float | None = None) -> Round:
        """The open round: the stored one, or round ``number`` with no contribution yet."""
        return cls.load(stored, dtype) if stored is not None else cls.open(number, config, now)

    @classmethod
    def load(cls, stored: RoundRecord, dtype: np.dtype) -> Round:
        meta = orjson.loads(stored.meta)
        return cls(meta["round"], meta["opened_at"], meta["deadline"], stored.version, meta["workers"],
                   meta["weight"], meta["loss_sum"], meta["losses"], np.frombuffer(stored.data, dtype))

    def status(self, config: Sync) -> RoundStatus:
        return RoundStatus(self.number, len(self.workers), config.contributions, list(self.workers),
                           self.opened_at if self.workers else None, self.deadline if self.workers else None)

    def due(self, config: Sync, now: float) -> bool:
        """Whether the round commits now: all K came, or its time is up with at least M."""
        received = len(self.workers)
        return received >= config.contributions or (
            self.deadline is not None and now >= self.deadline and received >= config.needed_at_timeout)

    def add(self, worker: str, weight: float, flat: np.ndarray, loss: float | None) -> Round:
        """This round with one more contribution (a new sum: the stored one is read-only)."""
        scaled = flat if weight == 1.0 else flat * flat.dtype.type(weight)  # one pass fewer at weight 1
        total = (scaled.copy() if scaled is flat else scaled) if self.sum is None else self.sum + scaled
        return Round(self.number, self.opened_at, self.deadline, self.version, [*self.workers, worker],
                     self.weight + weight, self.loss_sum + (loss * weight if loss is not None else 0.0),
                     self.losses + (loss is not None), total)

    def mean(self) -> np.ndarray:
        return self.sum / self.sum.dtype.type(self.weight)

    def mean_loss(self) -> float | None:
        return self.loss_sum / self.weight if self.losses == len(self.workers) and self.losses else None

    def record(self) -> RoundRecord:
        meta = {"round": self.number, "opened_at": self.opened_at, "deadline": self.deadline, "workers": self.workers,
                "weight": self.weight, "loss_sum": self.loss_sum, "losses": self.losses}
        return RoundRecord(self.version + 1, orjson.dumps(meta), np.ascontiguousarray(self.sum).view(np.uint8).data)
