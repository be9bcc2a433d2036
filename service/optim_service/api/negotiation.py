"""Content negotiation, bodies, and the conditional/idempotency headers, read from header values
(so the step lane, which has no Starlette ``Request``, and the routes share them)."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from .connection import WHOLE_BODY
from .limits import check_json_depth
from .jsonbody import loads_with_tensors

JSON = "application/json"
BINARY = "application/octet-stream"
_ETAG = re.compile(r'^\s*(?:W/)?"(\d{1,18})"\s*$')
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@lru_cache(maxsize=512)  # clients send the same few headers on every request
def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def require_content_type(content_type: str | None, *allowed: str) -> str:
    ctype = media_type(content_type)
    if ctype not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type must be {' or '.join(allowed)}, got {ctype or 'none'!r}"
        )
    return ctype


async def read_body(content_length: str | None, receive, limit: int, into: np.ndarray | None = None,
                    sink=None, hasher=None) -> bytes | bytearray | memoryview:
    """The body, read straight into one buffer of its declared length rather than collected in pieces
    and joined: a 4 MB step saves a copy. A body over ``limit`` bytes (``max_body_bytes``) is a 413
    that closes the connection: at once when its Content-Length says so, else when the bytes received
    pass it. Every route reads its body here, so this is the body limit (a middleware for it cost
    every request a layer). A body that arrives whole in one message, as every small step does, is
    taken as it is. Given ``into`` (uint8 memory at least that long), the body is read into its start
    and a view of it returned;
    with ``sink`` too (the server's ``connection.SINK``), the server reads the rest there itself.

    Plain loops, not an async generator: one left unfinished (the early return) is closed through
    the event loop's finaliser hook, which cost every small step a wake-up of the loop and a task.
    Given ``hasher``, every byte of the body is fed to it, in order, as it arrives."""
    declared = content_length or ""
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    update = hasher.update if hasher is not None else _nothing
    chunk, more = _chunk(await receive())
    update(chunk)
    if not declared.isdigit():  # chunked: counted as it arrives
        chunks, received = [chunk], len(chunk)
        while more and received <= limit:
            chunk, more = _chunk(await receive())
            update(chunk)
            chunks.append(chunk)
            received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        return b"".join(chunks)
    size = int(declared)
    if into is None and not more and len(chunk) == size:
        return chunk
    buf, filled = bytearray(size) if into is None else memoryview(into)[:size], 0
    while True:
        if filled + len(chunk) > size:
            raise InvalidRequest("the body is longer than its Content-Length")
        buf[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
        if not more:
            break
        written = sink(buf, filled, hasher) if sink is not None and into is not None else None
        if written is not None:  # the rest straight into buf; one empty message says it is there
            try:
                while more:
                    _, more = _chunk(await receive())
            finally:
                filled, written.view = written.filled, None  # the memory is the step's again
            break
        chunk, more = _chunk(await receive())
        update(chunk)
    if filled != size:
        raise InvalidRequest(f"the body ended after {filled} of its {size} declared bytes")
    return buf


def body_at_hand(scope, limit: int) -> bytes | None:
    """The request's whole body when the server already holds all of it (``connection.WHOLE_BODY``),
    under ``read_body``'s limit; else None, nothing taken, and ``read_body`` reads it. Call it
    before anything has been received."""
    take = scope.get("extensions", {}).get(WHOLE_BODY)
    body = None if take is None else take(scope)
    if body is not None and len(body) > limit:
        raise _too_large(limit)
    return body


async def request_body(request) -> bytes | bytearray | memoryview:
    """A route's body (``read_body`` under the app's limit): what every route but the step lane reads."""
    return await read_body(request.headers.get("content-length"), request.receive,
                           request.app.state.settings.max_body_bytes)


def _nothing(_) -> None:
    return None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over this service's limit of {limit} bytes; send large tensors as "
                           "application/octet-stream, or ask the operator to raise OPTIM_MAX_BODY_BYTES",
                           headers={"Connection": "close"})  # not read on: the rest is not wanted


def _chunk(message) -> tuple[bytes, bool]:
    """A body message's piece and whether more is to come; a client gone raises. (Not a coroutine
    around ``receive``: a layer less for every body.)"""
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), message.get("more_body", False)


def parse_json(body: bytes, model: type[BaseModel], tensors: str, max_depth: int) -> Any:
    """The validated model; its ``tensors`` field holds float64 ndarrays where the fast reader was
    sure of them, orjson's lists (checked element by element later) where it was not."""
    return validated(model, json_object(body, tensors, max_depth))


def json_object(body: bytes, tensors: str, max_depth: int) -> dict:
    """The body's JSON object, not yet validated (``validated``), read as ``parse_json`` reads it."""
    check_json_depth(body, max_depth)
    obj = loads_with_tensors(body, tensors)
    if obj is None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("the body must be a JSON object")
    return obj


def validated(model: type[BaseModel], obj: dict) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def prefers_minimal(prefer: str | None) -> bool:
    """RFC 7240 ``Prefer: return=minimal``: answer without the representation (the params)."""
    prefer = (prefer or "").lower()
    return any(p.split(";")[0].strip() == "return=minimal" for p in prefer.split(","))


MAX_WAIT_SECONDS = 300.0
_INT = re.compile(r"^\d{1,18}$")
_WORKER = re.compile(r"^[\x21-\x7e]{1,128}$")


def prefers_wait(prefer: str | None) -> float | None:
    """RFC 7240 ``Prefer: wait=N``: how long a contributor will wait for its round (at most 300 s)."""
    for part in (prefer or "").lower().split(","):
        key, _, value = part.split(";")[0].strip().partition("=")
        if key == "wait":
            try:
                seconds = float(value)
            except ValueError:
                raise InvalidRequest(f"Prefer: wait= takes seconds, got {value!r}") from None
            if not 0 <= seconds < float("inf"):
                raise InvalidRequest(f"Prefer: wait= takes seconds from 0, got {value!r}")
            return min(seconds, MAX_WAIT_SECONDS)
    return None


def dry_run_asked(query: bytes) -> bool:
    """``?dry_run=true`` (or 1): answer the would-be step, change nothing."""
    for part in query.decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if key == "dry_run":
            if value.lower() in ("true", "1", ""):
                return True
            if value.lower() in ("false", "0"):
                return False
            raise InvalidRequest(f"dry_run takes true or false, got {value!r}")
    return False


def contribution_headers(headers) -> dict:
    """A push's worker, weight, round and base step from Optim-* headers (for bodies without fields)."""
    said = {}
    if (worker := headers.get("optim-worker")) is not None:
        if not _WORKER.match(worker):
            raise InvalidRequest("Optim-Worker must be 1 to 128 visible ASCII characters")
        said["worker"] = worker
    if (weight := headers.get("optim-weight")) is not None:
        try:
            said["weight"] = float(weight)
        except ValueError:
            said["weight"] = float("nan")
        if not 0 < said["weight"] < float("inf"):
            raise InvalidRequest(f"Optim-Weight must be a finite number above 0, got {weight!r}")
    for header, name in (("optim-round", "round"), ("optim-base-step", "base_step")):
        if (value := headers.get(header)) is not None:
            if not _INT.match(value.strip()):
                raise InvalidRequest(f"{header.title()} must be a whole number from 0, got {value!r}")
            said[name] = int(value)
    return said


def if_match(value: str | None) -> int | None:
    if value is None or value.strip() == "*":
        return None
    match = _ETAG.match(value)
    if not match:
        raise InvalidRequest(f'If-Match must be a quoted step number such as "12", got {value!r}')
    return int(match.group(1))


def idempotency_key(key: str | None) -> str | None:
    if key is not None and not _KEY.match(key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key
