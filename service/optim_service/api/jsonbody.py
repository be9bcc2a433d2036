"""JSON bodies whose tensors arrive as float64 arrays, read the fastest way for their size.

A large body goes to simdjson, which copies each number array of the tensor field straight into a
float64 buffer, with no Python float per element: at 100k floats that is a third of the time of
orjson plus ``np.array`` (bench/wire.py). A body under ``SMALL_BODY_BYTES`` goes to orjson, with one
``np.array`` per tensor: on a small step simdjson's setup and the checks around it cost more than
the floats (100 floats: 13 µs of a step's latency, measured A/B against the simdjson path). Both
parsers round every number correctly, so the values are identical. Anything a reader is not sure
of returns None, and the caller parses with orjson and checks element by element, which also words
the error: for either reader, a boolean, null or string among the numbers, or rows of uneven
length; for simdjson also duplicate keys, numbers it refuses and brackets inside strings. Large
bodies with base64 tensors go to orjson too: there is no number array to win on.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

import numpy as np
import orjson
import simdjson

from .limits import count_byte

SMALL_BODY_BYTES = 4096  # where orjson plus np.array stops beating simdjson (~400 floats)


class _Unsure(Exception):
    pass


def is_b64_tensor(value: Any) -> bool:
    """``{"shape", "b64"}``, with an optional wire ``"dtype"`` (``codecs.dtypes``)."""
    return (isinstance(value, dict) and "b64" in value and "shape" in value and isinstance(value["b64"], str)
            and (len(value) == 2 or (len(value) == 3 and "dtype" in value)))


def loads_with_tensors(body: bytes, field: str) -> dict[str, Any] | None:
    """The body as orjson would give it, except that under ``field`` (one tensor, or an object of
    named tensors) every nested list of numbers is a float64 ndarray of the nesting's shape."""
    if len(body) < SMALL_BODY_BYTES:
        return _loads_small(body, field)
    if b'"b64"' in body:  # simdjson would hold two more copies of a long string; orjson one
        return None
    try:
        doc = simdjson.Parser().parse(body)  # one parser per body: live proxies pin their parser
        if not isinstance(doc, simdjson.Object):
            return None
        out, arrays = {}, 0
        for key in _unique_keys(doc):
            value = doc[key]
            if key == field:
                out[key], count = _tensors(value)
            else:
                if isinstance(value, simdjson.Object):
                    value = value.as_dict()
                elif isinstance(value, simdjson.Array):
                    value = value.as_list()
                out[key], count = value, _count_lists(value)
            arrays += count + _count_lists(key)
    except (_Unsure, ValueError, TypeError, RuntimeError, KeyError):
        return None
    # every '[' of the body is accounted for: none hides a nested list inside a tensor's elements
    return out if count_byte(body, b"[") == arrays else None


def _loads_small(body: bytes, field: str) -> dict[str, Any] | None:
    # np.array would read a boolean among numbers as 1.0 or 0.0; a "true" in a name or a string
    # only sends the body the exact way
    if b"true" in body or b"false" in body:
        return None
    try:
        out = orjson.loads(body)
        if not isinstance(out, dict):
            return None
        tensors = out.get(field)
        if isinstance(tensors, list):
            out[field] = _numbers(tensors)
        elif isinstance(tensors, dict) and not is_b64_tensor(tensors):  # not one base64 tensor's "shape"
            for name, tensor in tensors.items():
                if isinstance(tensor, list):
                    tensors[name] = _numbers(tensor)
    except (_Unsure, ValueError):  # orjson.JSONDecodeError is a ValueError
        return None
    return out


def _numbers(nested: list) -> np.ndarray:
    """Regular nested lists of JSON numbers as float64; anything else (ragged, null, strings) is unsure."""
    try:  # one flat list (most tensors): the array module's loop, not numpy's discovery of a type and shape
        return np.frombuffer(array("d", nested))
    except (TypeError, OverflowError):  # rows, null, strings; an int past float range
        pass
    numbers = np.array(nested)  # ragged raises; null, strings and mixed types give another kind
    if numbers.dtype.kind not in "fiu":
        raise _Unsure
    return numbers.astype(np.float64, copy=False)


def _unique_keys(obj) -> list[str]:
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):  # orjson keeps the last duplicate, simdjson the first
        raise _Unsure
    return keys


def _count_lists(value) -> int:
    """Lists in a small, already converted value; a '[' inside a string would throw the count off."""
    if isinstance(value, list):
        return 1 + sum(_count_lists(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_lists(k) + _count_lists(v) for k, v in value.items())
    if isinstance(value, str) and "[" in value:
        raise _Unsure
    return 0


def _tensors(value) -> tuple[Any, int]:
    if isinstance(value, simdjson.Array):
        return _tensor(value)
    if not isinstance(value, simdjson.Object):
        return value, 0  # wrong type: the validation after words it
    keys = _unique_keys(value)
    if "b64" in keys:  # base64 behind escaped quotes
        raise _Unsure
    out, arrays = {}, 0
    for name in keys:
        tensor = value[name]
        if isinstance(tensor, simdjson.Array):
            out[name], count = _tensor(tensor)
        elif isinstance(tensor, simdjson.Object):
            raise _Unsure  # base64 behind escaped keys, or a wrong type the exact path words
        else:
            out[name], count = tensor, 0  # a 0-d tensor, or a wrong type the decoder words
        arrays += count + _count_lists(name)
    return out, arrays


def _tensor(array) -> tuple[np.ndarray, int]:
    """A nested list of numbers as an ndarray, and how many lists its regular nesting holds."""
    shape, probe = [], array
    while isinstance(probe, simdjson.Array):
        shape.append(len(probe))
        if not shape[-1]:
            break
        probe = probe[0]
    _check_rows(array, shape)
    flat = np.frombuffer(array.as_buffer(of_type="d"), np.float64)  # flattens every level
    if flat.size != math.prod(shape):
        raise _Unsure
    lists = sum(math.prod(shape[:depth]) for depth in range(len(shape)))
    return flat.reshape(shape), lists


def _check_rows(array, shape: list[int]) -> None:
    """Every list above the last level holds lists of the length the first path promised."""
    if len(shape) < 2:
        return
    for row in array:
        if not isinstance(row, simdjson.Array) or len(row) != shape[1]:
            raise _Unsure
        _check_rows(row, shape[1:])
