"""Tensors in JSON bodies: nested lists, and ``{"shape", "b64"}`` objects (with an optional wire
``"dtype"``: float16 or bfloat16 travel in half the bytes and are widened to the session's dtype).
The codecs (``codecs/``) put them on and take them off the wire; create and checkpoint bodies use
them too.

Every decoder checks names, shapes, types and finiteness and raises ``InvalidRequest`` with a
sentence that says which tensor is wrong and how; nothing here touches a session's stored state.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np

from ..errors import InvalidRequest
from ..finite import require_finite
from ..record import DTYPES, Layout
from .codecs.dtypes import HALF, WIRE_DTYPES, narrow, widen, wire_dtype
from .jsonbody import is_b64_tensor

Encoding = str  # "list", "b64", or "b64:<wire dtype>" (how a tensor came, so its answer mirrors it)
QueryEncoding = Literal["list", "b64"]  # what GET .../params?encoding= may ask
MAX_NAME_LENGTH = 256
MAX_DIMENSIONS = 32  # numpy's limit
MAX_EXTENT_PRODUCT = 2**60


def decode_tensor(value: Any, what: str, dtype: str) -> np.ndarray:
    """One tensor (nested lists or b64 object) as a writable array of ``dtype``; finiteness is the
    caller's to check (gradients may be non-finite under ``nan_policy: "skip"``), under
    ``np.errstate(over="ignore")``: a number too large for the dtype becomes inf, which that check names."""
    np_dtype = DTYPES[dtype]
    if isinstance(value, np.ndarray):  # jsonbody read it: numbers only, rows regular
        return value.astype(np_dtype, copy=False)
    if is_b64_tensor(value):
        shape = value["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidRequest(f"{what}: 'shape' must be a list of non-negative integers")
        # numpy refuses a shape whose non-zero extents multiply past its index range, even when
        # another extent is zero and the array would be empty
        if len(shape) > MAX_DIMENSIONS or math.prod(d for d in shape if d) > MAX_EXTENT_PRODUCT:
            raise InvalidRequest(f"{what}: shape {shape} is too large to be an array")
        wire = value.get("dtype")
        if wire is not None and not isinstance(wire, str):
            raise InvalidRequest(f"{what}: 'dtype' must be a string such as \"bfloat16\"")
        wire = wire_dtype(wire, what) or dtype
        raw_dtype = WIRE_DTYPES[wire]
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what}: 'b64' is not valid base64") from None
        count = math.prod(shape)  # exact: a declared shape far larger than the data cannot overflow
        if len(raw) != count * raw_dtype.itemsize:
            raise InvalidRequest(
                f"{what}: shape {shape} needs {count * raw_dtype.itemsize} bytes of {wire}, "
                f"the base64 holds {len(raw)}"
            )
        # read-only when not widened: updates never write gradients
        array = widen(np.frombuffer(raw, raw_dtype).reshape(shape), np_dtype)
    else:
        array = _from_lists(value, what).astype(np_dtype, copy=False)
    return array


def _from_lists(value: Any, what: str) -> np.ndarray:
    if isinstance(value, bool) or not isinstance(value, (list, int, float)):
        raise InvalidRequest(
            f"{what}: expected a number, nested lists of numbers, or {{\"shape\", \"b64\"}}; "
            f"got {type(value).__name__}"
        )
    try:
        objects = np.array(value, dtype=object)
    except ValueError:
        raise InvalidRequest(f"{what}: nested lists are ragged; every row must have the same length") from None
    kinds = set(map(type, objects.flat))
    if kinds - {int, float}:
        bad = sorted(k.__name__ for k in kinds - {int, float})
        if "list" in bad:
            raise InvalidRequest(f"{what}: nested lists are ragged; every row must have the same length")
        bad = ["boolean" if b == "bool" else "null" if b == "NoneType" else b for b in bad]
        raise InvalidRequest(f"{what}: every element must be a number, found {', '.join(bad)}")
    try:
        return objects.astype(np.float64)
    except OverflowError:
        raise InvalidRequest(f"{what}: a number is too large for float64") from None


def decode_params(value: Any, dtype: str) -> tuple[Layout, list[np.ndarray]]:
    """A new session's params: one unnamed tensor (array) or an object of named tensors."""
    if isinstance(value, (list, np.ndarray)) or is_b64_tensor(value):
        with np.errstate(over="ignore"):
            array = decode_tensor(value, "params", dtype)
        require_finite(array, "params", dtype)
        return Layout(("",), (array.shape,), dtype, "array"), [array]
    if not isinstance(value, dict) or not value:
        raise InvalidRequest("params: expected a JSON array (one tensor) or an object of named tensors")
    arrays = []
    with np.errstate(over="ignore"):
        for name, tensor in value.items():
            if not name or len(name) > MAX_NAME_LENGTH:
                raise InvalidRequest(f"params: tensor names must have 1 to {MAX_NAME_LENGTH} characters")
            arrays.append(decode_tensor(tensor, f"tensor '{name}'", dtype))
            require_finite(arrays[-1], f"tensor '{name}'", dtype)
    layout = Layout(tuple(value), tuple(a.shape for a in arrays), dtype, "object")
    return layout, arrays


def encodings_of(value: Any) -> dict[str, Encoding] | Encoding:
    """How the client sent each tensor, so the answer mirrors it (unnamed tensor: key ""): one
    encoding for all of them when every tensor came as numbers, the usual body."""
    if type(value) is np.ndarray:  # (the JSON reader made arrays of number lists: nothing else is one)
        return "list"
    if type(value) is dict and value:
        for v in value.values():
            if type(v) is not np.ndarray:
                break
        else:
            return "list"

    def enc(v) -> Encoding:
        if not is_b64_tensor(v):
            return "list"
        wire = v.get("dtype")
        return f"b64:{wire.lower()}" if isinstance(wire, str) and wire.lower() in HALF else "b64"
    if isinstance(value, dict) and not is_b64_tensor(value):
        return {name: enc(v) for name, v in value.items()}
    return {"": enc(value)}


def decode_like(value: Any, layout: Layout, what: str, finite: bool = False,
                skippable: bool = False) -> list[np.ndarray | None]:
    """Tensors that must match an existing session's layout exactly (gradients, restored buffers).
    ``skippable``: a named tensor may be null, which skips it this step (torch's ``grad is None``)."""
    single = layout.structure == "array"
    if single:
        if not (isinstance(value, (list, np.ndarray)) or is_b64_tensor(value)):
            raise InvalidRequest(f"{what}: this session holds one unnamed tensor; send a JSON array")
    else:
        if not isinstance(value, dict) or is_b64_tensor(value):
            raise InvalidRequest(f"{what}: this session holds named tensors; send an object {list(layout.names)}")
        if value.keys() != layout.name_set:
            missing = [n for n in layout.names if n not in value]
            unknown = [n for n in value if n not in layout.name_set]
            raise InvalidRequest(
                f"{what}: expected tensors {list(layout.names)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
    arrays, skipped = [], 0
    with np.errstate(over="ignore"):
        for name, shape in zip(layout.names, layout.shapes):
            tensor = value if single else value[name]
            if tensor is None and skippable and name:
                arrays.append(None)
                skipped += 1
                continue
            label = f"{what} '{name}'" if name else what
            array = decode_tensor(tensor, label, layout.dtype)
            if array.shape != shape:
                raise InvalidRequest(f"{label}: expected shape {list(shape)}, got {list(array.shape)}")
            if finite:
                require_finite(array, label, layout.dtype)
            arrays.append(array)
    if skippable and skipped == len(arrays):
        raise InvalidRequest(f"{what}: every tensor's gradient is null, so there is nothing to step (torch's step "
                             "does nothing then); send at least one tensor's gradient")
    return arrays


def encode_tensor(array: np.ndarray, encoding: Encoding):
    if encoding == "b64":
        return {"shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}
    if encoding.startswith("b64:"):
        wire = encoding[4:]
        return {"shape": list(array.shape), "dtype": wire, "b64": base64.b64encode(narrow(array, wire).tobytes()).decode()}
    if array.ndim == 0:
        return array.item()  # orjson writes arrays of any rank but not 0-d ones
    return array  # orjson writes numpy arrays natively, without a Python-list detour


def encode_like(arrays: list[np.ndarray], layout: Layout, encodings: dict[str, Encoding] | Encoding):
    """Tensors in the structure the client used: one array, or an object keyed by name."""
    if isinstance(encodings, str):
        encoded = [encode_tensor(a, encodings) for a in arrays]
    else:
        encoded = [encode_tensor(a, encodings.get(n, "list")) for a, n in zip(arrays, layout.names)]
    return encoded[0] if layout.structure == "array" else dict(zip(layout.names, encoded))
