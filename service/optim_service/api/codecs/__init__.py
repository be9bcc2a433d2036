"""One codec per wire format, and the negotiation that picks them.

A codec reads a step's body (``read_step``: how to decode the gradients against the session's
layout, the loss, how each tensor came) and writes a session's parameters (``write_params``) in
its media type, in the session's dtype or a narrower wire dtype (``dtypes``):

- ``application/json`` (``json``): nested lists, or ``{"shape", "b64"}`` tensors, which may carry a
  ``"dtype"`` of float16 or bfloat16; answers mirror how each tensor came;
- ``application/octet-stream`` (``octet_stream``): every tensor's raw little-endian values in
  creation order, in the session's dtype or the one the ``Optim-Wire-Dtype`` header names;
- ``application/vnd.safetensors`` (``safetensors``): named tensors, each with its dtype, in the
  safetensors format.

The body's Content-Type picks the codec that reads it; ``negotiate`` picks the one that answers,
from ``Accept`` (its first type the service writes), and the answer's wire dtype, from that type's
``dtype`` parameter or else the ``Optim-Wire-Dtype`` header.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ...errors import NotAcceptable
from .base import Codec, StepBody
from .dtypes import WIRE_DTYPE_HEADER, wire_dtype
from .json import JsonCodec
from .octet_stream import OctetStreamCodec
from .safetensors import SafetensorsCodec

JSON, BINARY, SAFETENSORS = JsonCodec.media_type, OctetStreamCodec.media_type, SafetensorsCodec.media_type


CODECS: dict[str, Codec] = {JSON: JsonCodec(), BINARY: OctetStreamCodec(), SAFETENSORS: SafetensorsCodec()}
_ANY = {"*/*": JSON, "application/*": JSON, "application/problem+json": JSON}


class Answer(NamedTuple):
    codec: Codec
    wire: str | None  # the dtype tensors travel in; None: the session's

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(WIRE_DTYPE_HEADER.encode(), self.wire.encode())] if self.wire else []


DEFAULT = Answer(CODECS[JSON], None)


@lru_cache(maxsize=512)  # clients send the same few headers on every step
def negotiate(accept: str | None, wire_header: str | None = None) -> Answer:
    """The codec and wire dtype of the answer: ``Accept``'s first type the service writes (JSON when
    there is none), 406 when it names only others."""
    wire = wire_dtype(wire_header, "Optim-Wire-Dtype") if wire_header else None
    if not accept:
        return DEFAULT if wire is None else Answer(CODECS[JSON], wire)
    for part in accept.split(","):
        kind, _, params = part.partition(";")
        kind = kind.strip().lower()
        media = _ANY.get(kind, kind)
        if media in CODECS:
            asked = _parameter(params, "dtype")
            return Answer(CODECS[media], wire_dtype(asked, "Accept", accept=True) if asked else wire)
    raise NotAcceptable(f"this route answers {', '.join(CODECS)}, not {accept!r}")


def _parameter(params: str, name: str) -> str | None:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


__all__ = ["BINARY", "CODECS", "JSON", "SAFETENSORS", "Answer", "Codec", "StepBody", "negotiate", "wire_dtype"]
