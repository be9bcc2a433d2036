"""The one finiteness check, for tensors arriving and for state about to be stored."""

from __future__ import annotations

import numpy as np

from .errors import InvalidRequest
from .optim.kernels import magnitude, magnitude_bits, top_bits


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


class Scan:
    """max|x| over values of ``dtype`` as they are read into ``memory`` (uint8), each part as it
    arrives while it is still in cache: an update may go in place only when its gradients are
    bounded, and a pass of its own over 10M of them took 1.6 ms. ``top`` is inf if any is NaN or ±Inf."""

    __slots__ = ("_bits", "_itemsize", "_done", "_top", "_dtype")

    def __init__(self, memory: np.ndarray, dtype: np.dtype):
        self._itemsize, self._dtype = dtype.itemsize, dtype
        self._bits = magnitude_bits(memory[:len(memory) // dtype.itemsize * dtype.itemsize].view(dtype))
        self._done, self._top = 0, 0

    def over(self, filled: int) -> None:
        """The first ``filled`` bytes are in: take the values they complete."""
        end = filled // self._itemsize
        if end > self._done:
            self._top = max(self._top, top_bits(self._bits[self._done:end], serial=True))
            self._done = end

    @property
    def top(self) -> float:
        return magnitude(self._top, self._dtype)
