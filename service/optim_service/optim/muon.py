"""Muon (Jordan et al. 2024; torch.optim.Muon): momentum SGD whose update for a 2-D weight matrix is
orthogonalized, replaced by ≈ UVᵀ of its SVD through 5 Newton–Schulz iterations in bfloat16.

The iterations run in bfloat16 as torch's do: every matrix product and sum is computed in float32
from bfloat16 operands and rounded to bfloat16 once (ml_dtypes' bfloat16, round to nearest even).
torch's CPU kernels sum in another order, so a few elements of an update can land one bfloat16 step
(2⁻⁸ relative) apart; tests hold parameters to torch within lr·2⁻⁶ per step and the momentum buffer
to float tolerance (docs/math.md). 2-D tensors only: give biases, norms and embeddings to another
session (AdamW, as the Muon papers do).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import ml_dtypes
import numpy as np
from pydantic import Field, model_validator

from .base import Bool, Float, Hyperparameters, Optimizer, lerp_, reference_step, zeros

BF16 = np.dtype(ml_dtypes.bfloat16)
Coefficients = Annotated[tuple[Float, Float, Float], Field(strict=False)]


class MuonHyperparameters(Hyperparameters):
    lr: Float = 1e-3
    weight_decay: Float = 0.1
    momentum: Float = 0.95
    nesterov: Bool = True
    ns_coefficients: Coefficients = (3.4445, -4.7750, 2.0315)
    eps: Float = 1e-7
    ns_steps: Annotated[int, Field(strict=True, ge=0, lt=100)] = 5
    adjust_lr_fn: Literal["original", "match_rms_adamw"] | None = Field(
        None, description='scale lr by √max(1, rows/cols) ("original", the default) or 0.2·√max(rows, cols) '
                          '("match_rms_adamw": AdamW\'s lr and weight decay carry over)')

    @model_validator(mode="after")
    def _torch_checks(self):
        if not 0.0 <= self.lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {self.lr}")
        if not 0.0 <= self.momentum:
            raise ValueError(f"momentum should be >= 0 but is: {self.momentum}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {self.weight_decay}")
        return self


class MuonState(NamedTuple):
    momentum_buffer: np.ndarray


def init(param: np.ndarray, hp: MuonHyperparameters) -> MuonState:
    return MuonState(zeros(param))


def check_shape(shape: tuple[int, ...]) -> str | None:
    if len(shape) != 2:
        return (f"muon orthogonalizes 2-D weight matrices only, and this tensor has shape {list(shape)}; "
                "train biases, norms and embeddings in a second session (adamw, as the Muon papers do)")
    return None


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(BF16)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def newton_schulz(update: np.ndarray, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> np.ndarray:
    """≈ UVᵀ of ``update``, in bfloat16 (torch's ``_zeropower_via_newtonschulz``)."""
    a, b, c = coefficients
    x = _bf16(update)
    tall = update.shape[0] > update.shape[1]
    if tall:
        x = x.T
    norm = _bf16(np.sqrt(np.sum(np.square(_f32(x)))))
    x = _bf16(_f32(x) / max(_f32(norm), _f32(_bf16(np.asarray(eps)))))
    for _ in range(steps):
        x32 = _f32(x)
        gram = _bf16(x32 @ x32.T)
        g32 = _f32(gram)
        gram_update = _bf16(np.float32(b) * g32 + np.float32(c) * (g32 @ g32))
        x = _bf16(np.float32(a) * x32 + _f32(gram_update) @ x32)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def update(param, grad, state: MuonState, hp: MuonHyperparameters, step: int) -> None:
    buf = state.momentum_buffer
    lerp_(buf, grad, 1 - hp.momentum)
    if hp.nesterov:
        change = grad.copy()
        lerp_(change, buf, hp.momentum)
    else:
        change = buf
    orthogonal = newton_schulz(change, hp.ns_coefficients, hp.ns_steps, hp.eps)
    param *= 1 - hp.lr * hp.weight_decay
    param += -adjusted_lr(hp.lr, hp.adjust_lr_fn, param.shape) * orthogonal.astype(param.dtype)


muon = Optimizer(
    "muon", MuonHyperparameters, init, update, reference_step(update), MuonState,
    "B ← μB + (1−μ)g, θ ← θ(1 − ηλ) − η′·NewtonSchulz₅(nesterov(B)) in bfloat16, 2-D only (torch.optim.Muon)",
    torch="Muon", check_shape=check_shape, elementwise=False,
)
