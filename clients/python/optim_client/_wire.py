"""numpy ⇄ the service's wire: b64 tensors in JSON, and the raw little-endian octet-stream."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2")}
HALF = ("float16", "bfloat16")


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":  # numpy has none: ml_dtypes', which the service reads too
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else np.dtype(dtype).newbyteorder("<").name


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]  # ("",) for one unnamed tensor
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # the session's state: float32 or float64
    wire: str | None = None  # what tensors travel as when narrower: float16 or bfloat16

    @property
    def travels(self) -> str:
        return self.wire or self.dtype

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        """The params' size on the wire: a binary answer's length."""
        return sum(self.sizes) * np_dtype(self.travels).itemsize

    @property
    def named(self) -> bool:
        return self.names != ("",)

    @classmethod
    def from_metadata(cls, meta: dict, wire: str | None = None) -> "Layout":
        shapes = meta["shapes"]
        if isinstance(shapes, dict):
            return cls(tuple(shapes), tuple(tuple(s) for s in shapes.values()), meta["dtype"], wire)
        return cls(("",), (tuple(shapes),), meta["dtype"], wire)


def infer_dtype(params) -> str:
    arrays = params.values() if isinstance(params, dict) else [params]
    return "float64" if all(np.asarray(a).dtype == np.float64 for a in arrays) else "float32"


def infer_wire(params) -> str | None:
    """float16 or bfloat16 when every array is: they travel so, over float32 state on the server."""
    arrays = params.values() if isinstance(params, dict) else [params]
    names = {dtype_name(np.asarray(a).dtype) for a in arrays}
    return names.pop() if len(names) == 1 and next(iter(names)) in HALF else None


def as_arrays(tensors, layout_or_dtype) -> tuple[tuple[str, ...], list[np.ndarray | None]]:
    """Name order and contiguous little-endian arrays of the dtype they travel in (None stays None: a
    named tensor with no gradient skips the step)."""
    dtype = np_dtype(layout_or_dtype if isinstance(layout_or_dtype, str) else layout_or_dtype.travels)
    if isinstance(tensors, dict):
        names = tuple(tensors) if isinstance(layout_or_dtype, str) else layout_or_dtype.names
        missing = [n for n in names if n not in tensors]
        if missing or len(tensors) != len(names):
            raise ValueError(f"expected tensors {list(names)}, got {list(tensors)}")
        return names, [None if tensors[n] is None else np.asarray(tensors[n], dtype=dtype, order="C") for n in names]
    return ("",), [np.asarray(tensors, dtype=dtype, order="C")]


def to_b64(array: np.ndarray) -> dict:
    """A contiguous array as ``{"shape", "b64"}``, with its ``"dtype"`` when it travels as half."""
    name = dtype_name(array.dtype)
    if name not in HALF:
        return {"shape": list(array.shape), "b64": base64.b64encode(array.data).decode()}
    return {"shape": list(array.shape), "dtype": name, "b64": base64.b64encode(array.tobytes()).decode()}


def from_b64(doc: dict, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(doc["b64"]), np_dtype(doc.get("dtype", dtype))).reshape(doc["shape"]).copy()


def from_json(value, layout: Layout) -> list[np.ndarray]:
    def one(v):
        if isinstance(v, dict):
            return from_b64(v, layout.dtype)
        return np.asarray(v, dtype=np_dtype(layout.travels))
    if layout.named:
        return [one(value[n]) for n in layout.names]
    return [one(value)]


def from_binary(body, layout: Layout) -> list[np.ndarray]:
    """Views of ``body``, one per tensor (writable when the body is)."""
    flat = np.frombuffer(body, np_dtype(layout.travels))
    out, offset = [], 0
    for shape, size in zip(layout.shapes, layout.sizes):
        out.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return out


def mirror(arrays: list[np.ndarray], layout: Layout):
    """One array in → one array out; a dict in → a dict out."""
    return dict(zip(layout.names, arrays)) if layout.named else arrays[0]
