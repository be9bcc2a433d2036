"""``POST /v1/sessions/{id}/step``, the hottest route, served straight from ASGI.

A small JSON step's server time is all Python glue, a little of it in each layer (README,
"Performance"). So ``StepLane``, the outermost of the service's middlewares, reads the headers
once, keeps the request's context itself (its id, access-log line and error count, as
``RequestContextMiddleware`` does for every other request), answers with two ASGI messages, and
maps errors through the app's own exception handlers: no Starlette ``Request`` or ``Response``,
router, dependency injection, background task or middleware of its own. Every other request, and a
step with another method (405), goes on to FastAPI, whose APIRoute documents the step and serves
it through the same ``serve_step``.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from typing import Callable

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response

import orjson

from ..rounds import Contribution
from ..sessions import StepResult, body_digest, body_hasher, digest_of, on_kernel_thread
from .. import shm
from ..errors import AnswerUndelivered
from ..observability import request_done, request_id_of, request_id_var
from .codecs import BINARY, CODECS, StepBody, negotiate
from .connection import SINK
from .codecs.dtypes import WIRE_DTYPE_HEADER
from .codecs.octet_stream import decode_binary
from .deps import Tenant, caller_of
from .negotiation import (body_at_hand, contribution_headers, dry_run_asked, idempotency_key, if_match, parse_json,
                          prefers_wait, read_body, require_content_type)
from .schemas import SharedMemoryStep

STEP_PATH = re.compile(r"/v1/sessions/([^/]+)/step")
SHARED_MEMORY = "application/vnd.optim.shm+json"  # gradients and answer in registered regions (shm.py)
WIRE_FORMATS = {"application/json": "json", "application/octet-stream": "binary",
                "application/vnd.safetensors": "safetensors", SHARED_MEMORY: "shm"}  # the metrics' label


class StepLane:
    """The outermost middleware: a step it answers itself, with its request id, access-log line and
    error count (``observability``); everything else goes on. With CORS on, a step that names an
    ``Origin`` (a browser's) goes on too, to be answered by the route through CORS."""

    def __init__(self, app, service, metrics, cors: bool):
        self.app, self.service, self.metrics, self.cors = app, service, metrics, cors

    async def __call__(self, scope, receive, send):
        scope["app"] = self.service  # what Starlette's __call__ would have set: a server runs this first
        match = scope["type"] == "http" and scope["method"] == "POST" and STEP_PATH.fullmatch(
            scope["path"].removeprefix(scope.get("root_path", "")))
        if not match:
            return await self.app(scope, receive, send)
        # the first value of each header, as Starlette's Headers.get gives it (ASGI names are lowercase)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        if self.cors and "origin" in headers:
            return await self.app(scope, receive, send)
        request_id = request_id_of(headers.get("x-request-id"))
        token, started, status = request_id_var.set(request_id), time.perf_counter(), 500
        try:
            state = self.service.state
            try:
                caller = state.anonymous or await caller_of(state, headers.get("authorization"))
                reply = await serve_step(match[1], headers, receive, caller, state, scope["query_string"], scope)
            except Exception as exc:
                handler = _handler_for(self.service.exception_handlers, exc)
                if handler is None:
                    raise  # a bug: uvicorn answers 500 and logs the traceback
                reply = await handler(Request(scope, receive), exc)
            reply.raw_headers.append((b"x-request-id", request_id.encode()))
            status = reply.status_code
            await reply(scope, receive, send)
        finally:
            request_done(self.metrics, scope, status, started)
            request_id_var.reset(token)


class StepReply(Response):
    """A step's answer: its headers already encoded (so ``Response.__init__``, which would encode
    them again, is not called), sent as two messages, then ``observe``: the step settled and its
    metrics recorded (after the send: the client is not kept waiting for them). The APIRoute
    returns it as any Response."""

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes | memoryview, observe: Callable[[], None],
                 status: int = 200):
        self.status_code, self.raw_headers, self.body, self.background = status, headers, body, None
        self.observe = observe

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            self.observe()


async def serve_step(session_id: str, headers: Mapping[str, str], receive, caller: Tenant, state: State,
                     query: bytes = b"", scope=None) -> StepReply:
    """Read a step in any codec's format, apply it through the session service, and answer it in
    the format ``Accept`` asks. ``scope``, the lane's, lets the server read a binary body's rest
    straight into the step's memory (``connection.SINK``)."""
    started = time.perf_counter()
    ctype = require_content_type(headers.get("content-type"), *CODECS, SHARED_MEMORY)
    answer = negotiate(headers.get("accept"), headers.get(WIRE_DTYPE_HEADER))  # refuse a bad Accept before anything
    dry_run = bool(query) and dry_run_asked(query)
    # each optional header's parser only where it came: most steps send none of them
    key = idempotency_key(headers["idempotency-key"]) if "idempotency-key" in headers and not dry_run else None
    expected = if_match(headers["if-match"]) if "if-match" in headers else None
    length, memory, sink = headers.get("content-length"), None, None
    if ctype == BINARY and length and length.isdigit() and WIRE_DTYPE_HEADER not in headers:
        memory = caller.sessions.binary_memory(caller.owner, session_id, int(length))
        sink = _sink_of(scope) if scope is not None else None
    wait = prefers_wait(headers["prefer"]) if "prefer" in headers else None
    said = contribution_headers(headers)
    # a raw body's digest is taken as it arrives, where the socket's pace leaves time (40 MB: 5 ms)
    hasher = body_hasher(ctype + _fields(said)) if key and ctype == BINARY else None
    limit = state.settings.max_body_bytes
    body = body_at_hand(scope, limit) if scope is not None and memory is None and hasher is None else None
    if body is None:
        body = await read_body(length, receive, limit, into=memory, sink=sink, hasher=hasher)
    volatile = answer_into = None
    if ctype == SHARED_MEMORY:
        request, into_region, memory, volatile = await read_shared_step(body, caller, session_id, state)
        answer_into = shm.mapped(into_region) if into_region is not None else None
    else:
        request, into_region = CODECS[ctype].read_step(body, headers, state.settings.max_json_depth), None
    said.update(request.contribution)  # the body's own fields win over headers
    idempotency = None
    if key:
        idempotency = (key, digest_of(hasher) if hasher is not None and not request.contribution
                       else body_digest(ctype + _fields(said), body))
    result = await caller.sessions.step(caller.owner, session_id, request.decode, loss=request.loss,
                                        if_match=expected, idempotency=idempotency, memory=memory,
                                        contribution=Contribution(**said) if said else Contribution(),
                                        dry_run=dry_run, settle_later=True, volatile=volatile,
                                        answer_into=answer_into)
    try:
        if result.pending is not None and wait:  # RFC 7240: hold the answer while the round may commit
            result = await caller.sessions.wait_round(caller.owner, session_id, result.pending.round, wait) or result
        session = result.session
        out = [(b"etag", b'"%d"' % session.step), (b"server-timing", b"compute;dur=%.3f" % result.compute_ms)]
        if result.replayed:
            out.append((b"idempotent-replayed", b"true"))
        if result.dry_run:
            out.append((b"optim-dry-run", b"true"))
        if result.pending is not None:  # taken into a round still open: 202 and where the round stands
            content = orjson.dumps(result.pending.document())
            out += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
            return StepReply(out, content, lambda: _observe(state.metrics, result, WIRE_FORMATS[ctype], started), 202)
        if result.skipped:
            out.append((b"optim-step-skipped", b"true"))
        extra = {"grad_norm": result.grad_norm} if result.grad_norm is not None else {}
        if result.skipped:
            extra["skipped"] = True
        if result.lr_scale is not None:
            extra |= {"lr_scale": result.lr_scale, "staleness": result.staleness}
        if result.round is not None:
            extra["round"] = result.round
        if into_region is not None:  # the params into the client's region, and only where they went in the body
            try:
                if not result.answered:  # (an update in place wrote them there as it went)
                    await _copying(into_region.size, state, shm.write, into_region, session.params_bytes())
            except OSError as e:  # e.g. /dev/shm full: the step stands, its answer can be asked again
                raise AnswerUndelivered(
                    f"step {session.step} was applied, but its params could not be written into region "
                    f"{into_region.region.name!r} ({e.strerror}): make room and repeat the request with the same "
                    "Idempotency-Key to have them written") from None
            content = orjson.dumps({"step": session.step, "params": into_region.document(), **extra})
            out += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
        else:
            content = answer.codec.write_params(session, answer.wire, request.encodings, extra)
            out += [*answer.headers(), (b"content-type", answer.codec.media_type.encode()),
                    (b"content-length", b"%d" % len(content))]
        return StepReply(out, content, lambda: _observe(state.metrics, result, WIRE_FORMATS[ctype], started))
    except BaseException:
        if result.settle is not None:  # no answer to wait for
            result.settle()
        raise


async def _copying(nbytes: int, state: State, copy: Callable, *args):
    """``copy(*args)``, which moves ``nbytes``: on the kernel thread where an update of as many float32s
    would go, off the event loop."""
    if nbytes >= 4 * state.settings.thread_offload_elements:
        return await on_kernel_thread(copy, *args)
    return copy(*args)


async def read_shared_step(body, caller: Tenant, session_id: str, state: State):
    """A step whose gradients lie in a registered region, and the region its answer should go into,
    both checked now, so that a bad one refuses the step rather than lose its answer. A file's
    gradients are read now (into the step's working copy where the binary path would read its
    body); a sealed memfd's are left where they lie, with a copy to take (the same way) unless the
    update goes in place (``SessionService.step``'s ``volatile``). Returns the step's body, where its
    answer goes (None: in the body), the memory the gradients are read into (None: fresh) and
    that copy (None: made)."""
    req = parse_json(body, SharedMemoryStep, "gradients", state.settings.max_json_depth)
    regions, owner = state.regions, caller.owner
    span = regions.span(owner, req.gradients.model_dump(), None, "gradients")
    into = None  # the params take as many bytes as the gradients
    if req.params is not None:
        into = regions.span(owner, req.params.model_dump(), span.size, "params")
    memory, limit = caller.sessions.binary_memory(owner, session_id, span.size), state.settings.max_body_bytes
    shm.check_size(span, limit)
    grads = [shm.mapped(span)]

    async def copy() -> None:
        grads[0] = await _copying(span.size, state, shm.read, span, memory, limit)

    volatile = copy
    if grads[0] is None:
        await copy()
        volatile = None
    said = {k: v for k in ("worker", "weight", "round", "base_step") if (v := getattr(req, k)) is not None}
    step = StepBody(lambda session: decode_binary(grads[0], session.layout), req.loss, {}, said)
    return step, into, memory, volatile


def _sink_of(scope):
    """The server's offer to read this request's body into memory (``connection.SINK``), if it makes one."""
    offer = scope.get("extensions", {}).get(SINK)
    return None if offer is None else functools.partial(offer, scope)


def _fields(said: dict) -> str:
    return "".join(f";{k}={v}" for k, v in sorted(said.items()))


def _observe(metrics, result: StepResult, wire_format: str, started: float) -> None:
    """Once a step's answer is sent: the step's ``settle``, then its metrics."""
    if result.settle is not None:
        result.settle()
    if result.dry_run:
        return
    if result.staleness is not None:
        metrics.staleness.observe(result.staleness)
    if result.pending is not None or result.round is not None:
        outcome = "replayed" if result.replayed else "committed" if result.round is not None else "accepted"
        metrics.contributions.labels(outcome).inc()
        if result.pending is not None:
            return
        if outcome == "committed":
            metrics.rounds.inc()
    outcome = "replayed" if result.replayed else "skipped" if result.skipped else "applied"
    steps, compute, latency = metrics.step_series(result.session.config.optimizer.type, outcome, wire_format)
    steps.inc()
    if outcome == "applied":
        compute.observe(result.compute_ms / 1e3)
        if result.in_place:
            metrics.in_place.inc()
    latency.observe(time.perf_counter() - started)


def _handler_for(handlers: dict, exc: Exception):
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
