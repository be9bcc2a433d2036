"""The one finiteness check, for tensors arriving and for state about to be stored."""

from __future__ import annotations

import numpy as np

from .errors import InvalidRequest


def first_non_finite(array: np.ndarray) -> tuple[int, ...] | None:
    if array.size == 0 or np.isfinite(array).all():
        return None
    return tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])


def require_finite(array: np.ndarray, what: str, dtype: str) -> None:
    index = first_non_finite(array)
    if index is not None:
        raise InvalidRequest(
            f"{what}: non-finite value {float(array[index])} at index {list(index)} "
            f"(NaN and ±Inf are refused; a finite JSON number may also overflow {dtype})"
        )
