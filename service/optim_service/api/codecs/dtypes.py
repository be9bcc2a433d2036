"""Wire dtypes: what tensors may travel as, whatever dtype the session keeps.

A session keeps float32 or float64 state (the master copy); its tensors may travel in that dtype or
narrower, as float16 or bfloat16 (half the bytes of float32), and are widened on arrival and narrowed
for the answer, rounding to nearest even as torch's ``.to(torch.bfloat16)`` does. bfloat16 is
ml_dtypes' numpy dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ...errors import InvalidRequest, NotAcceptable

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
HALF = ("float16", "bfloat16")
WIRE_DTYPE_HEADER = "optim-wire-dtype"


def wire_dtype(value: str | None, what: str, accept: bool = False) -> str | None:
    """A wire dtype named in a header, a media type's parameter or a tensor: one of
    ``WIRE_DTYPES`` (422, or 406 for what ``Accept`` asks)."""
    if value is None:
        return None
    name = value.strip().lower()
    if name not in WIRE_DTYPES:
        error = NotAcceptable if accept else InvalidRequest
        raise error(f"{what}: dtype {value!r} is not one of {', '.join(WIRE_DTYPES)}")
    return name


def widen(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Values of a wire dtype as the session's dtype (the array itself when they are the same)."""
    return raw if raw.dtype == dtype else raw.astype(dtype)


def narrow(array: np.ndarray, wire: str | None) -> np.ndarray:
    """A session's values in the wire dtype (the array itself when that is its own)."""
    if wire is None or array.dtype == WIRE_DTYPES[wire]:
        return array
    with np.errstate(over="ignore"):  # past float16's range is ±inf, as torch's .half() gives
        return array.astype(WIRE_DTYPES[wire])
