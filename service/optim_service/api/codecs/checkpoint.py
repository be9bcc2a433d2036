"""A checkpoint as a safetensors file: what ``GET .../state`` writes for ``Accept:
application/vnd.safetensors``, and ``POST /v1/sessions`` resumes bit-exactly.

Its tensors are ``params/<name>`` and ``state/<name>/<buffer>`` (torch's buffer names; a session's
one unnamed tensor is named ``tensor``), in the session's dtype, so that ``safetensors.numpy.load``
or ``safetensors.torch.load`` reads them as any other file. The header's ``__metadata__`` holds
``checkpoint``: the JSON checkpoint without its tensors (config, dtype, step, per-tensor steps,
tensor names in creation order), which is what makes the file resumable.
"""

from __future__ import annotations

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ...errors import InvalidRequest
from ...record import Session
from ..schemas import CreateSession
from . import safetensors as st

MAX_HEADER_BYTES = 100 << 20


def write(session: Session) -> bytes:
    layout = session.layout
    names = st.names_of(layout)
    arrays = {f"params/{n}": p for n, p in zip(names, session.params)}
    for i, name in enumerate(names):
        arrays.update((f"state/{name}/{k}", v) for k, v in session.buffers(i).items())
    state = {"step": session.step}
    if session.tensor_steps is not None:
        state["tensor_steps"] = dict(zip(layout.names, session.tensor_steps))
    doc = {"schema_version": 1, **session.config.model_dump(mode="json"), "dtype": layout.dtype,
           "structure": layout.structure, "names": list(names), "state": state}
    return st.write(arrays, {"checkpoint": orjson.dumps(doc).decode()})


def read(body) -> CreateSession:
    """The create body a safetensors checkpoint holds; 422 for a file that is not one."""
    doc = _checkpoint_metadata(body)
    found = st.read(body, "checkpoint")
    names, structure = doc.pop("names", None), doc.pop("structure", None)
    if not isinstance(names, list) or not names or structure not in ("array", "object"):
        raise InvalidRequest("checkpoint: its metadata names no tensors; write it with GET /v1/sessions/{id}/state")
    state = doc.get("state")
    if not isinstance(state, dict):
        raise InvalidRequest("checkpoint: its metadata has no state")
    params, buffers = {}, {}
    for name in names:
        key = f"params/{name}"
        if key not in found:
            raise InvalidRequest(f"checkpoint: tensor '{key}' is missing")
        params[name] = found.pop(key)
        prefix = f"state/{name}/"
        buffers[name] = {k[len(prefix):]: found.pop(k) for k in [k for k in found if k.startswith(prefix)]}
    if found:
        raise InvalidRequest(f"checkpoint: tensors {sorted(found)} belong to no parameter")
    if structure == "array":
        params, buffers = params[names[0]], buffers[names[0]]
    try:
        return CreateSession.model_validate({**doc, "params": params, "state": {**state, "buffers": buffers}})
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def _checkpoint_metadata(body) -> dict:
    if len(body) < 8:
        raise InvalidRequest("checkpoint: not a safetensors body (shorter than its 8-byte header length)")
    size = int.from_bytes(bytes(body[:8]), "little")
    if size > min(len(body) - 8, MAX_HEADER_BYTES):
        raise InvalidRequest("checkpoint: not a safetensors body (its header length runs past the body)")
    try:
        header = orjson.loads(bytes(body[8:8 + size]))
        doc = orjson.loads(header["__metadata__"]["checkpoint"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest("checkpoint: a safetensors body without optim-service's checkpoint metadata; "
                             "write it with GET /v1/sessions/{id}/state and Accept: application/vnd.safetensors") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("checkpoint: its metadata is not an object")
    return doc
