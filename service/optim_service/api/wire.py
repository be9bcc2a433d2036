"""Tensors on the wire: nested JSON lists, ``{"shape", "b64"}`` objects, and raw octet-streams.

Every decoder checks names, shapes, types and finiteness and raises ``InvalidRequest`` with a
sentence that says which tensor is wrong and how; nothing here touches a session's stored state.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np
import orjson

from ..errors import InvalidRequest
from ..finite import require_finite
from ..optim.base import Run
from ..record import DTYPES, Layout, Session
from .jsonbody import is_b64_tensor
from .negotiation import BINARY, JSON

Encoding = Literal["list", "b64"]
MAX_NAME_LENGTH = 256
MAX_DIMENSIONS = 32  # numpy's limit
MAX_EXTENT_PRODUCT = 2**60


def decode_tensor(value: Any, what: str, dtype: str) -> np.ndarray:
    """One tensor (nested lists or b64 object) as a writable array of ``dtype``; finiteness is the
    caller's to check (gradients may be non-finite under ``nan_policy: "skip"``), under
    ``np.errstate(over="ignore")``: a number too large for the dtype becomes inf, which that check names."""
    np_dtype = DTYPES[dtype]
    if is_b64_tensor(value):
        shape = value["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidRequest(f"{what}: 'shape' must be a list of non-negative integers")
        # numpy refuses a shape whose non-zero extents multiply past its index range, even when
        # another extent is zero and the array would be empty
        if len(shape) > MAX_DIMENSIONS or math.prod(d for d in shape if d) > MAX_EXTENT_PRODUCT:
            raise InvalidRequest(f"{what}: shape {shape} is too large to be an array")
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what}: 'b64' is not valid base64") from None
        count = math.prod(shape)  # exact: a declared shape far larger than the data cannot overflow
        if len(raw) != count * np_dtype.itemsize:
            raise InvalidRequest(
                f"{what}: shape {shape} needs {count * np_dtype.itemsize} bytes of {dtype}, "
                f"the base64 holds {len(raw)}"
            )
        array = np.frombuffer(raw, np_dtype).reshape(shape)  # read-only: updates never write gradients
    else:
        array = _from_lists(value, what).astype(np_dtype, copy=False)
    return array


def _from_lists(value: Any, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):  # jsonbody read it: numbers only, rows regular
        return value
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


def encodings_of(value: Any) -> dict[str, Encoding]:
    """How the client sent each tensor, so the answer mirrors it (unnamed tensor: key "")."""
    def enc(v) -> Encoding:
        return "b64" if is_b64_tensor(v) else "list"
    if isinstance(value, dict) and not is_b64_tensor(value):
        return {name: enc(v) for name, v in value.items()}
    return {"": enc(value)}


def decode_like(value: Any, layout: Layout, what: str, finite: bool = False,
                skippable: bool = False) -> list[np.ndarray | None]:
    """Tensors that must match an existing session's layout exactly (gradients, restored buffers).
    ``skippable``: a named tensor may be null, which skips it this step (torch's ``grad is None``)."""
    if layout.structure == "array":
        if not (isinstance(value, (list, np.ndarray)) or is_b64_tensor(value)):
            raise InvalidRequest(f"{what}: this session holds one unnamed tensor; send a JSON array")
        items = [("", value)]
    else:
        if not isinstance(value, dict) or is_b64_tensor(value):
            raise InvalidRequest(f"{what}: this session holds named tensors; send an object {list(layout.names)}")
        missing = [n for n in layout.names if n not in value]
        known = set(layout.names)
        unknown = [n for n in value if n not in known]
        if missing or unknown:
            raise InvalidRequest(
                f"{what}: expected tensors {list(layout.names)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        items = [(n, value[n]) for n in layout.names]
    arrays = []
    with np.errstate(over="ignore"):
        for (name, tensor), shape in zip(items, layout.shapes):
            if tensor is None and skippable and name:
                arrays.append(None)
                continue
            label = f"{what} '{name}'" if name else what
            array = decode_tensor(tensor, label, layout.dtype)
            if array.shape != shape:
                raise InvalidRequest(f"{label}: expected shape {list(shape)}, got {list(array.shape)}")
            if finite:
                require_finite(array, label, layout.dtype)
            arrays.append(array)
    if skippable and all(a is None for a in arrays):
        raise InvalidRequest(f"{what}: every tensor's gradient is null, so there is nothing to step (torch's step "
                             "does nothing then); send at least one tensor's gradient")
    return arrays


def decode_binary(body: bytes, layout: Layout) -> Run:
    """Every tensor's values concatenated in creation order, C order, little-endian session dtype."""
    if len(body) != layout.nbytes:
        raise InvalidRequest(
            f"binary body: expected {layout.nbytes} bytes ({sum(layout.sizes)} {layout.dtype} values "
            f"for shapes {layout.shapes_json()}), got {len(body)}"
        )
    return Run(np.frombuffer(body, layout.np_dtype), layout.shapes)  # views of the body itself: no copy


def encode_tensor(array: np.ndarray, encoding: Encoding):
    if encoding == "b64":
        return {"shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}
    if array.ndim == 0:
        return array.item()  # orjson writes arrays of any rank but not 0-d ones
    return array  # orjson writes numpy arrays natively, without a Python-list detour


def encode_like(arrays: list[np.ndarray], layout: Layout, encodings: dict[str, Encoding] | Encoding):
    """Tensors in the structure the client used: one array, or an object keyed by name."""
    if isinstance(encodings, str):
        encodings = dict.fromkeys(layout.names, encodings)
    encoded = [encode_tensor(a, encodings.get(n, "list")) for a, n in zip(arrays, layout.names)]
    return encoded[0] if layout.structure == "array" else dict(zip(layout.names, encoded))


def params_answer(session: Session, binary: bool, encodings, extra: dict) -> tuple[bytes | memoryview, str]:
    """A session's params as an answer body and its media type: the raw bytes (a view of the
    session's memory), or ``{"step", "params", **extra}`` as JSON in the client's structure."""
    if binary:
        return session.params_bytes(), BINARY
    doc = {"step": session.step, "params": encode_like(session.params, session.layout, encodings), **extra}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), JSON
