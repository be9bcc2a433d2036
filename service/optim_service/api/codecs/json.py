"""``application/json``: ``{"gradients", "loss"?}`` in; ``{"step", "params", ...}`` out, each tensor
as it came (nested lists, or b64 in its wire dtype), or all as b64 in a wire dtype asked for."""

from __future__ import annotations

import orjson

from .. import wire as tensors
from ..negotiation import json_object, validated
from ..schemas import StepRequest
from .base import StepBody


class JsonCodec:
    media_type = "application/json"

    def read_step(self, body, headers, max_json_depth: int) -> StepBody:
        obj = json_object(body, "gradients", max_json_depth)
        if len(obj) == 1 and "gradients" in obj:  # all StepRequest would check: its gradients are Any
            gradients, loss, said = obj["gradients"], None, {}
        else:
            req = validated(StepRequest, obj)
            gradients, loss = req.gradients, req.loss
            said = {k: v for k in ("worker", "weight", "round", "base_step") if (v := getattr(req, k)) is not None}

        def decode(session):
            return tensors.decode_like(gradients, session.layout, "gradient", skippable=True)

        return StepBody(decode, loss, tensors.encodings_of(gradients), said)

    def write_params(self, session, wire: str | None, encodings, extra: dict) -> bytes:
        if wire is not None:
            encodings = f"b64:{wire}"
        doc = {"step": session.step, "params": tensors.encode_like(session.params, session.layout, encodings), **extra}
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
