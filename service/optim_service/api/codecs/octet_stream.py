"""``application/octet-stream``: every tensor's values concatenated in creation order, C order,
little-endian, in the session's dtype or the one ``Optim-Wire-Dtype`` names. The fastest wire:
gradients are views of the body (or of the session's working copy it was read into), and an
answer in the session's dtype is a view of the session's memory."""

from __future__ import annotations

import numpy as np

from ...errors import InvalidRequest
from ...optim.base import Run
from ...record import Layout
from .base import StepBody
from .dtypes import WIRE_DTYPE_HEADER, WIRE_DTYPES, narrow, widen, wire_dtype


def decode_binary(body, layout: Layout, wire: str | None = None) -> Run:
    """The gradients of a raw body, in ``wire`` dtype (the session's when None)."""
    raw_dtype = WIRE_DTYPES[wire] if wire else layout.np_dtype
    expected = sum(layout.sizes) * raw_dtype.itemsize
    if len(body) != expected:
        raise InvalidRequest(
            f"binary body: expected {expected} bytes ({sum(layout.sizes)} {wire or layout.dtype} values "
            f"for shapes {layout.shapes_json()}), got {len(body)}"
        )
    return Run(widen(np.frombuffer(body, raw_dtype), layout.np_dtype), layout.shapes)  # no copy in its own dtype


class OctetStreamCodec:
    media_type = "application/octet-stream"

    def read_step(self, body, headers, max_json_depth: int) -> StepBody:
        wire = wire_dtype(headers.get(WIRE_DTYPE_HEADER), "Optim-Wire-Dtype")
        return StepBody(lambda session: decode_binary(body, session.layout, wire), None, {})

    def write_params(self, session, wire: str | None, encodings, extra: dict) -> bytes | memoryview:
        own = session.params_bytes()
        if wire is None or WIRE_DTYPES[wire] == session.layout.np_dtype:
            return own
        return narrow(np.frombuffer(own, session.layout.np_dtype), wire).view(np.uint8).data  # its bytes
