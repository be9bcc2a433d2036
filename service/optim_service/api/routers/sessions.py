"""/v1/sessions: create, step, read, list, delete, checkpoint."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import orjson
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from ...errors import InvalidRequest, NotAcceptable, SessionNotFound
from ... import history
from ...diagnosis import Thresholds, diagnose
from ...optim.base import Optimizer
from ...record import Layout, Session, layout_from_meta
from .. import wire
from ..deps import Caller
from ..codecs import JSON, SAFETENSORS, Answer, negotiate
from ..codecs import checkpoint
from ..codecs.dtypes import WIRE_DTYPE_HEADER
from ...sessions import body_digest
from ..negotiation import BINARY, idempotency_key, parse_json, prefers_minimal, request_body, require_content_type
from ..steplane import SHARED_MEMORY, serve_step
from ..responses import JSONResponse
from ..schemas import (
    EXAMPLE_CREATE,
    EXAMPLE_STEP,
    PROBLEMS,
    SESSION_PROBLEMS,
    STEP_PROBLEMS,
    CreatedSession,
    CreateSession,
    DiagnosisAnswer,
    ForkRequest,
    RollbackRequest,
    HistoryAnswer,
    ParamsAnswer,
    RoundInfo,
    SessionInfo,
    SessionPage,
    StepAnswer,
    _problem,
    answers,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def describe(session_id: str, meta: dict) -> dict:
    """The metadata document of GET /v1/sessions/{id}."""
    layout = layout_from_meta(meta)
    config = meta["config"]
    return {
        "id": session_id,
        "step": meta["step"],
        "optimizer": {"type": config["optimizer"]["type"], **config["optimizer"]},
        "dtype": meta["dtype"],
        "shapes": layout.shapes_json(),
        "num_parameters": sum(layout.sizes),
        "schedule": config["schedule"],
        "clip_grad_norm": config["clip_grad_norm"],
        "param_groups": config["param_groups"],
        "loss": meta["loss"],
        "skipped_steps": meta["skipped_steps"],
        "nan_policy": config["nan_policy"],
        "aggregation": config.get("aggregation", {"mode": "each"}),
        "created_at": _iso(meta["created_at"]),
        "updated_at": _iso(meta["updated_at"]),
        **({"forked_from": meta["forked_from"]} if "forked_from" in meta else {}),
    }


def _etag(step: int) -> dict[str, str]:
    return {"ETag": f'"{step}"'}


def _params_response(session: Session, answer: Answer, encodings, headers: dict) -> Response:
    content = answer.codec.write_params(session, answer.wire, encodings, {})
    headers.update((k.decode(), v.decode()) for k, v in answer.headers())
    return Response(content, media_type=answer.codec.media_type, headers=headers)


def json_body(model, example) -> dict:
    return {"requestBody": {"required": True, "content": {JSON: {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}, "example": example}}}}


@router.post("", status_code=201, openapi_extra=json_body(CreateSession, EXAMPLE_CREATE),
             responses={**answers(CreatedSession, status=201), **PROBLEMS,
                        415: STEP_PROBLEMS[415]},
             summary="Create a session, or resume one from a checkpoint")
async def create_session(request: Request, caller: Caller) -> Response:
    ctype = require_content_type(request.headers.get("content-type"), JSON, SAFETENSORS)
    minimal = prefers_minimal(request.headers.get("prefer"))
    body = await request_body(request)
    if ctype == SAFETENSORS:  # a checkpoint GET .../state wrote in that format
        body = checkpoint.read(body)
    else:
        body = parse_json(body, CreateSession, "params", request.app.state.settings.max_json_depth)
    layout, params = wire.decode_params(body.params, body.dtype)
    config, encodings = body.training_config(), wire.encodings_of(body.params)
    restored = None
    if body.state is not None:
        restored = (body.state.step, _decode_buffers(body.state.buffers, layout, config.algorithm),
                    _tensor_steps(body.state.tensor_steps, body.state.step, layout))
    schedule_state = body.state.schedule_state if body.state is not None else None
    del body  # its text (a base64 string can be the size of the params) is not needed past here
    session = await caller.sessions.create(caller.owner, config, layout, params, restored, schedule_state)
    meta = orjson.loads(orjson.dumps(session.meta()))  # as the store holds it
    doc = describe(session.id, meta)
    headers = {"Location": f"/v1/sessions/{session.id}", **_etag(session.step)}
    if minimal:  # the client has the params it sent: a large session is not sent back
        headers["Preference-Applied"] = "return=minimal"
    else:
        doc["params"] = wire.encode_like(session.params, layout, encodings)
    return JSONResponse(doc, status_code=201, headers=headers)


def _tensor_steps(value: dict[str, int] | None, step: int, layout: Layout) -> tuple[int, ...] | None:
    """A checkpoint's per-tensor step counts: one per named tensor, none past the session's step."""
    if value is None:
        return None
    if layout.structure != "object" or set(value) != set(layout.names):
        raise InvalidRequest(f"state.tensor_steps: expected an object with tensors {list(layout.names)}")
    if over := [n for n in layout.names if value[n] > step]:
        raise InvalidRequest(f"state.tensor_steps: {over} counted more updates than the session's step {step}")
    steps = tuple(value[n] for n in layout.names)
    return None if all(t == step for t in steps) else steps


def _decode_buffers(value, layout: Layout, algorithm: Optimizer) -> list[dict]:
    """A checkpoint's buffers, mirroring its params: {name: {buffer: tensor}} or {buffer: tensor},
    each of the shape the optimizer keeps it in (its parameter's, a scalar's, a row's...)."""
    per_tensor = [value] if layout.structure == "array" else None
    if layout.structure == "object":
        if not isinstance(value, dict) or set(value) != set(layout.names):
            raise InvalidRequest(f"state.buffers: expected an object with tensors {list(layout.names)}")
        per_tensor = [value[n] for n in layout.names]
    out = []
    for name, shape, buffers in zip(layout.names, layout.shapes, per_tensor):
        if not isinstance(buffers, dict):
            raise InvalidRequest("state.buffers: expected an object of buffer name → tensor")
        out.append({
            k: wire.decode_like({name: v}, Layout((name,), (algorithm.buffer_shape(k, shape),), layout.dtype, "object"),
                                f"state.buffers{'.' + name if name else ''}.{k}", finite=True)[0]
            for k, v in buffers.items()
        })
    return out


@router.post("/{session_id}/step", openapi_extra={"requestBody": {"required": True, "content": {
    JSON: {"schema": {"$ref": "#/components/schemas/StepRequest"}, "example": EXAMPLE_STEP},
    BINARY: {"schema": {"type": "string", "format": "binary"}},
    SAFETENSORS: {"schema": {"type": "string", "format": "binary"}},
    SHARED_MEMORY: {"schema": {"$ref": "#/components/schemas/SharedMemoryStep"}}}}},
    responses={**answers(StepAnswer, binary=True), **answers(RoundInfo, status=202), **STEP_PROBLEMS},
    summary="Apply one optimizer step and return the updated parameters")
async def step(
    session_id: str, request: Request, caller: Caller,
    dry_run: Annotated[bool, Query(description="answer the would-be step and change nothing")] = False,
) -> Response:
    # app.py's StepLane serves this before the router is reached; the route documents it
    return await serve_step(session_id, request.headers, request.receive, caller, request.app.state,
                            request.scope["query_string"])


@router.post("/{session_id}/rollback", responses={**answers(SessionInfo), **SESSION_PROBLEMS,
                                                  409: _problem("the step is outside the kept window of snapshots"),
                                                  415: STEP_PROBLEMS[415]},
             openapi_extra=json_body(RollbackRequest, {"to_step": 12}),
             summary="Restore the state of an earlier step, bit-exactly, from the kept snapshots")
async def rollback_session(session_id: str, request: Request, caller: Caller) -> Response:
    require_content_type(request.headers.get("content-type"), JSON)
    raw = await request_body(request)
    body = parse_json(raw, RollbackRequest, "none", request.app.state.settings.max_json_depth)
    key = idempotency_key(request.headers.get("idempotency-key"))
    meta, replayed = await caller.sessions.rollback(caller.owner, session_id, body.to_step,
                                                    (key, body_digest(JSON, bytes(raw))) if key else None)
    headers = {**_etag(meta["step"]), **({"Idempotent-Replayed": "true"} if replayed else {})}
    return JSONResponse(describe(session_id, meta), headers=headers)


@router.post("/{session_id}/fork", status_code=201, responses={**answers(SessionInfo, status=201), **SESSION_PROBLEMS},
             summary="A new session at the same step with bit-identical state, hyperparameters overridden")
async def fork_session(session_id: str, request: Request, caller: Caller) -> Response:
    raw = await request_body(request)
    body = parse_json(raw, ForkRequest, "none", request.app.state.settings.max_json_depth) if raw else ForkRequest()
    key = idempotency_key(request.headers.get("idempotency-key"))
    session, replayed = await caller.sessions.fork(caller.owner, session_id, body.optimizer,
                                                   (key, body_digest(JSON, bytes(raw))) if key else None)
    meta = orjson.loads(orjson.dumps(session.meta()))
    return JSONResponse(describe(session.id, meta), status_code=201,
                        headers={"Location": f"/v1/sessions/{session.id}", **_etag(session.step),
                                 **({"Idempotent-Replayed": "true"} if replayed else {})})


@router.get("/{session_id}", responses={**answers(SessionInfo), **SESSION_PROBLEMS},
            summary="Session metadata: step, optimizer, hyperparameters, shapes, the next step's lr")
async def get_session(session_id: str, caller: Caller) -> Response:
    record, meta = await caller.sessions.meta(caller.owner, session_id)
    return JSONResponse({**describe(record.id, meta), "next_lr": caller.sessions.next_lrs(record)},
                        headers=_etag(meta["step"]))


@router.get("/{session_id}/history", responses={**answers(HistoryAnswer), **SESSION_PROBLEMS,
                                                406: STEP_PROBLEMS[406]},
            summary="One line per step: loss, lr per group, gradient norm, update ratios (JSON, or CSV by Accept)")
async def get_history(
    session_id: str, request: Request, caller: Caller,
    since: Annotated[int | None, Query(ge=0, description="the first step to include")] = None,
    every: Annotated[int | None, Query(ge=1, le=1_000_000, description="only steps that are multiples of it")] = None,
) -> Response:
    csv_wanted = _wants_csv(request.headers.get("accept"))
    steps = history.select(await caller.sessions.history(caller.owner, session_id), since, every)
    if csv_wanted:
        return Response(history.to_csv(steps), media_type="text/csv; charset=utf-8")
    return JSONResponse({"history": steps})


@router.get("/{session_id}/diagnosis", responses={**answers(DiagnosisAnswer), **SESSION_PROBLEMS},
            summary="A verdict on training from the history: diverging, oscillating, too_slow, plateau, healthy")
async def get_diagnosis(session_id: str, request: Request, caller: Caller) -> Response:
    s = request.app.state.settings
    thresholds = Thresholds(s.diagnosis_window, s.diagnosis_min_steps, s.diagnosis_divergence_factor,
                            s.diagnosis_oscillation_fraction, s.diagnosis_slow_decrease, s.diagnosis_slow_ratio,
                            s.diagnosis_patience)
    _, meta = await caller.sessions.meta(caller.owner, session_id)
    range_test = (meta["config"].get("schedule") or {}).get("type") == "lr_range_test"
    return JSONResponse(diagnose(await caller.sessions.history(caller.owner, session_id), thresholds, range_test))


@router.get("/{session_id}/events", responses={200: {"description": "text/event-stream: one `step` event per "
                                                               "history line as it lands"}, **SESSION_PROBLEMS},
            summary="Server-sent events: the session's steps as they land")
async def get_events(
    session_id: str, request: Request, caller: Caller,
    since: Annotated[int | None, Query(ge=0, description="the last step already seen (default: send all kept)")] = None,
) -> Response:
    last = -1 if since is None else since
    await caller.sessions.history_after(caller.owner, session_id, last)  # 404 now, not mid-stream

    async def stream():
        nonlocal last
        quiet = 0.0
        while not await request.is_disconnected():
            try:
                steps = await caller.sessions.history_after(caller.owner, session_id, last)
            except SessionNotFound:
                yield b"event: gone\ndata: {}\n\n"
                return
            for entry in steps:
                last = entry["step"]
                yield b"id: %d\nevent: step\ndata: %s\n\n" % (last, orjson.dumps(entry))
            quiet = 0.0 if steps else quiet + EVENTS_POLL_SECONDS
            if quiet >= 15:  # a comment now and then keeps proxies from closing an idle stream
                quiet = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(EVENTS_POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


EVENTS_POLL_SECONDS = 0.5


def _wants_csv(accept: str | None) -> bool:
    """``Accept``'s first type of the two history is written in: text/csv, or JSON (406 for neither)."""
    for part in (accept or "").split(","):
        kind = part.split(";")[0].strip().lower()
        if kind == "text/csv":
            return True
        if kind in (JSON, "*/*", "application/*", "text/*", "application/problem+json"):
            return False
    if accept and accept.strip():
        raise NotAcceptable(f"history is {JSON} or text/csv, not {accept!r}")
    return False


@router.get("/{session_id}/round", responses={**answers(RoundInfo), **SESSION_PROBLEMS,
                                              409: _problem("the session does not step in synchronous rounds")},
            summary="The open round of a session in synchronous rounds")
async def get_round(session_id: str, caller: Caller) -> Response:
    status = await caller.sessions.round_status(caller.owner, session_id)
    return JSONResponse(status.document(), headers=_etag(status.round))


@router.get("/{session_id}/params", responses={**answers(ParamsAnswer, binary=True), **SESSION_PROBLEMS,
                                               406: STEP_PROBLEMS[406]},
            summary="The current parameters (JSON, or binary by Accept)")
async def get_params(
    session_id: str, request: Request, caller: Caller,
    encoding: Annotated[wire.QueryEncoding, Query(description="list (nested JSON) or b64")] = "list",
) -> Response:
    answer = negotiate(request.headers.get("accept"), request.headers.get(WIRE_DTYPE_HEADER))
    session = await caller.sessions.load(caller.owner, session_id)
    return _params_response(session, answer, encoding, _etag(session.step))


@router.get("/{session_id}/state", responses={**answers(CreateSession), **SESSION_PROBLEMS},
            summary="A checkpoint: POST it to /v1/sessions to resume bit-exactly")
async def get_state(session_id: str, request: Request, caller: Caller) -> Response:
    answer = negotiate(request.headers.get("accept"))
    session = await caller.sessions.load(caller.owner, session_id)
    if answer.codec.media_type == SAFETENSORS:
        return Response(checkpoint.write(session), media_type=SAFETENSORS, headers=_etag(session.step))
    if answer.codec.media_type != JSON:
        raise NotAcceptable(f"a checkpoint is {JSON} or {SAFETENSORS}, not {answer.codec.media_type}")
    layout = session.layout
    buffers = [{k: wire.encode_tensor(v, "b64") for k, v in session.buffers(i).items()}
               for i in range(len(session.params))]
    doc = {
        "schema_version": 1,
        **session.config.model_dump(mode="json"),
        "dtype": layout.dtype,
        "params": wire.encode_like(session.params, layout, "b64"),
        "state": {"step": session.step,
                  "buffers": buffers[0] if layout.structure == "array" else dict(zip(layout.names, buffers)),
                  **({"tensor_steps": dict(zip(layout.names, session.tensor_steps))}
                     if session.tensor_steps is not None else {}),
                  **({"schedule_state": session.schedule_state} if session.schedule_state is not None else {})},
    }
    return JSONResponse(doc, headers=_etag(session.step))


@router.get("", responses={**answers(SessionPage), **PROBLEMS}, summary="The caller's sessions, paged by id")
async def list_sessions(
    request: Request, caller: Caller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64, description="the last id of the previous page")] = None,
) -> Response:
    rows = await caller.sessions.list(caller.owner, limit, after)
    items = [describe(r.id, meta) for r, meta in rows]
    return JSONResponse({"sessions": items, "next": items[-1]["id"] if len(items) == limit else None})


@router.delete("/{session_id}", status_code=204, responses={204: {"description": "Deleted"}, **SESSION_PROBLEMS},
               summary="Delete a session and its state")
async def delete_session(session_id: str, caller: Caller) -> Response:
    await caller.sessions.delete(caller.owner, session_id)
    return Response(status_code=204)
