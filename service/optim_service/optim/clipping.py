"""Gradient clipping by total norm, as ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import Float


class ClipGradNorm(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_norm: Annotated[Float, Field(ge=0)]
    norm_type: Union[Float, Literal["inf", "-inf"]] = Field(
        2.0, description='any p; JSON has no infinity, so the max-norm is spelled "inf"'
    )

    @property
    def ord(self) -> float:
        return float(self.norm_type)


def clip_coefficient(grads: list[np.ndarray], clip: ClipGradNorm) -> tuple[float, float]:
    """The gradients' joint norm (each tensor's norm, then the norm of those, as torch does) and the
    factor that brings it to at most ``max_norm``."""
    p = clip.ord
    norms = [np.linalg.norm(g.reshape(-1), ord=p) if g.size else 0.0 for g in grads]
    total = float(np.linalg.norm(np.asarray(norms, dtype=np.float64), ord=p)) if norms else 0.0
    return total, min(clip.max_norm / (total + 1e-6), 1.0)
