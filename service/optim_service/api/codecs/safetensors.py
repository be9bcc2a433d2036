"""``application/vnd.safetensors``: named tensors in the safetensors format (an 8-byte header
length, a JSON header of names, dtypes, shapes and offsets, then the raw values), each tensor in
the session's dtype or a wire dtype (F32, F64, F16, BF16). A session's one unnamed tensor is named
``tensor``. The parameters' answer carries the step in the header's ``__metadata__``."""

from __future__ import annotations

import numpy as np
import safetensors
import safetensors.numpy

from ...errors import InvalidRequest
from .base import StepBody
from .dtypes import WIRE_DTYPES, narrow, widen

MEDIA_TYPE = "application/vnd.safetensors"
FORMAT_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}
UNNAMED = "tensor"


def names_of(layout) -> tuple[str, ...]:
    return layout.names if layout.structure == "object" else (UNNAMED,)


def read(body, what: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors body, in its own (wire) dtype; 422 for anything else."""
    try:
        entries = safetensors.deserialize(bytes(body))
    except Exception as e:  # the parser's errors are SafetensorError and friends, with a message
        raise InvalidRequest(f"{what}: not a safetensors body ({e})") from None
    out = {}
    for name, entry in entries:
        wire = FORMAT_DTYPES.get(entry["dtype"])
        if wire is None:
            raise InvalidRequest(f"{what} '{name}': dtype {entry['dtype']} is not one of {', '.join(FORMAT_DTYPES)}")
        out[name] = np.frombuffer(entry["data"], WIRE_DTYPES[wire]).reshape(entry["shape"])
    return out


def write(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in arrays.items()}, metadata=metadata)


def decode_named(found: dict[str, np.ndarray], layout, what: str) -> list[np.ndarray]:
    """``found``'s tensors in the layout's order, shapes checked, widened to the session dtype."""
    names = names_of(layout)
    missing, unknown = [n for n in names if n not in found], [n for n in found if n not in set(names)]
    if missing or unknown:
        raise InvalidRequest(f"{what}: expected tensors {list(names)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    arrays = []
    for name, shape in zip(names, layout.shapes):
        if found[name].shape != shape:
            raise InvalidRequest(f"{what} '{name}': expected shape {list(shape)}, got {list(found[name].shape)}")
        arrays.append(widen(found[name], layout.np_dtype))
    return arrays


class SafetensorsCodec:
    media_type = MEDIA_TYPE

    def read_step(self, body, headers, max_json_depth: int) -> StepBody:
        found = read(body, "gradient")
        return StepBody(lambda session: decode_named(found, session.layout, "gradient"), None, {})

    def write_params(self, session, wire: str | None, encodings, extra: dict) -> bytes:
        arrays = {n: narrow(p, wire) for n, p in zip(names_of(session.layout), session.params)}
        metadata = {"step": str(session.step), **{k: str(v) for k, v in extra.items()}}
        return write(arrays, metadata)
