"""Sync and async clients as thin twins over one request builder and one response reader.

Only the transport call and the sleep differ between the twins. A step carries one Idempotency-Key
for the logical call, reused across its retries, so a retry after a lost answer is never applied twice.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from typing import Any

import httpx
import numpy as np

from . import _shm, _wire
from ._transport import BODY_INTO, WRITABLE_BODY, AsyncHTTPClientTransport, HTTPClientTransport
from .errors import APIConnectionError, APITimeoutError, OptimError, for_status

JSON = "application/json"
BINARY = "application/octet-stream"
RETRY_STATUSES = {408, 409, 429, 502, 503, 504}
BINARY_MIN_ELEMENTS = 64  # below this JSON is as fast and easier to read in logs


@dataclass
class _Call:
    """One logical request: everything needed to send it, and to send it again."""

    method: str
    path: str
    json: Any = None
    content: list[memoryview] | None = None  # the body's pieces, sent one after another: no joined copy
    headers: dict[str, str] = field(default_factory=dict)
    retry_safe: bool = True  # reads, deletes and keyed steps may be resent
    into: Any = None  # ``length -> bytearray``: where a binary answer is read (``_AnswerMemory``)

    def kwargs(self, asynchronous: bool = False) -> dict:
        kw: dict[str, Any] = {"headers": self.headers}
        if self.into is not None:
            kw["extensions"] = {BODY_INTO: self.into}
        if self.json is not None:
            kw["json"] = self.json
        if self.content is not None:  # a fresh iterable per attempt; the length said, so not chunked
            kw["headers"] = {**self.headers, "Content-Length": str(sum(map(len, self.content)))}
            kw["content"] = _pieces(self.content) if asynchronous else self.content
        return kw


async def _pieces(pieces: list[memoryview]):
    for piece in pieces:
        yield piece


def _wants_body(response: httpx.Response) -> bool:
    """Whether the body still has to be read: not a binary answer the transport already holds in
    writable memory (httpx's ``read`` would copy it once more)."""
    return not (WRITABLE_BODY in response.extensions and response.status_code < 400
                and response.headers.get("content-type", "").startswith(BINARY))


def _read(response: httpx.Response):
    if response.status_code >= 400:
        try:
            problem = response.json()
            detail = problem.get("detail") or problem.get("title") or response.text
        except ValueError:
            problem, detail = None, response.text or response.reason_phrase
        raise for_status(response.status_code, detail, problem)
    if response.status_code == 204:
        return None
    if response.headers.get("content-type", "").startswith(BINARY):
        return response
    return response.json()


def _backoff(attempt: int, response: httpx.Response | None, base: float = 0.25, cap: float = 8.0) -> float:
    retry_after = response.headers.get("retry-after") if response is not None else None
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), cap)
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


class _NoCookies(CookieJar):
    """The service sets no cookies: the SDK does not parse every answer for them (httpx would, at a
    cost of about a tenth of a small step's round trip)."""

    def extract_cookies(self, response, request) -> None:
        return None


class _Base:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int,
                 shared_memory: bool = False):
        self._shm = _shm.SharedMemory(shared_memory)
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._headers = {"User-Agent": "optim-client/0.1"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._urls: dict[str, httpx.URL] = {}

    @property
    def shared_memory_refused(self) -> str | None:
        """Why the server refused this client's shared-memory regions (then steps go over the wire)."""
        return self._shm.refused

    def _http_options(self) -> dict:
        return {"headers": self._headers, "timeout": self._timeout, "cookies": _NoCookies()}

    def _url(self, path: str) -> httpx.URL:
        """The absolute URL of a path, parsed once: httpx parses a path relative to a base URL twice
        on every request, which costs a small step more than its whole body does."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 4096:  # one step path per session: bounded for long-lived clients
                self._urls.clear()
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    def _retry(self, call: _Call, attempt: int, error: Exception | None, response: httpx.Response | None):
        """Seconds to wait before another attempt, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if error is not None:
            sent = not isinstance(error, httpx.ConnectError)
            return _backoff(attempt, None) if call.retry_safe or not sent else None
        if response is not None and response.status_code in RETRY_STATUSES and call.retry_safe:
            return _backoff(attempt, response)
        return None


def _connection_error(error: Exception) -> Exception:
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {error}")
    return APIConnectionError(f"cannot reach the service: {error}")


def _create_call(params, optimizer: str, dtype, hyperparameters: dict, **options) -> tuple[_Call, list[np.ndarray]]:
    """The request, and the params as the session starts from them (the answer does not repeat them).
    Half-precision params travel as they are, over float32 state (``dtype`` may say float64)."""
    wire = _wire.infer_wire(params)
    dtype = dtype or _wire.infer_dtype(params)
    names, arrays = _wire.as_arrays(params, wire or dtype)
    tensors = [_wire.to_b64(a) for a in arrays]
    body = {
        "optimizer": {"type": optimizer, **hyperparameters},
        "params": dict(zip(names, tensors)) if isinstance(params, dict) else tensors[0],
        "dtype": dtype,
    }
    body.update({key: value for key, value in options.items() if value is not None})
    call = _Call("POST", "/v1/sessions", json=body, headers={"Prefer": "return=minimal"}, retry_safe=False)
    return call, [a.copy() for a in arrays]


class _AnswerMemory:
    """The memory a session's binary answers are read into (or, over shared memory, its params are
    copied into), reused once nothing views it any more. A fresh buffer costs its first-touch page
    faults on top of the copy: 40 MB took 16–20 ms, and on this project's VM at times 100 ms, where
    reused memory took 7–13. A loop that keeps only the last answer (``params = session.step(g)``)
    alternates between two buffers; one that keeps every answer gets fresh memory each time."""

    KEEP = 2  # the answer the caller (and the session) holds, and the one being read

    def __init__(self, length: int):
        self.length = length
        self._kept: list[bytearray] = []

    def __call__(self, length: int) -> bytearray:
        if length != self.length:  # not params (a problem, a round's standing): nothing to reuse
            return bytearray(length)
        for buffer in self._kept:
            if sys.getrefcount(buffer) == 3:  # the list, the loop and the call: no array views it
                return buffer
        buffer = bytearray(length)
        self._kept = [buffer, *self._kept[:self.KEEP - 1]]
        return buffer


def _step_call(session: "_SessionBase", gradients, loss: float | None, fields: dict | None = None,
               wait: float | None = None) -> _Call:
    """A step, or with ``fields`` (worker, weight, round, base_step) a push to a round or an
    asynchronous session: in the body's JSON, or as Optim-* headers beside raw bytes."""
    _, arrays = _wire.as_arrays(gradients, session.layout)
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    if wait is not None:
        headers["Prefer"] = f"wait={wait:g}"
    skips = any(a is None for a in arrays)  # a tensor without a gradient: only JSON says so (null)
    if loss is None and not skips and sum(a.size for a in arrays) >= BINARY_MIN_ELEMENTS:
        headers |= {"Content-Type": BINARY, "Accept": BINARY}
        headers |= {"Optim-" + k.replace("_", "-").title(): str(v) for k, v in fields.items()}
        if session.layout.wire:  # the body and the answer in it
            headers["Optim-Wire-Dtype"] = session.layout.wire
        return _Call("POST", f"/v1/sessions/{session.id}/step", headers=headers, into=session._answers,
                     content=[a.reshape(-1).view(np.uint8).data for a in arrays])  # flat bytes, bfloat16 too
    grads = [None if a is None else _wire.to_b64(a) for a in arrays]
    body: dict[str, Any] = {"gradients": dict(zip(session.layout.names, grads)) if session.layout.named else grads[0]}
    if loss is not None:
        body["loss"] = float(loss)
    body.update(fields)
    return _Call("POST", f"/v1/sessions/{session.id}/step", json=body, headers=headers)


def _shm_step_call(session: "_SessionBase", regions: _shm.SessionRegions | None, gradients, loss: float | None,
                   fields: dict, answer: int) -> _Call | None:
    """A step through the session's shared-memory regions, its params into region ``answer``, or None
    to go over the wire."""
    if regions is None:
        return None
    _, arrays = _wire.as_arrays(gradients, session.layout)
    if any(a is None for a in arrays):  # a tensor without a gradient needs JSON's null
        return None
    body = regions.step_body(arrays, loss, fields, answer)
    return _Call("POST", f"/v1/sessions/{session.id}/step", content=[memoryview(body)],
                 headers={"Idempotency-Key": uuid.uuid4().hex, "Content-Type": _shm.MEDIA_TYPE})


def _shm_call(request) -> _Call:
    """A ``_shm.Request`` (method, path, JSON body) as a call: retried freely unless it registers."""
    method, path, body = request
    return _Call(method, path, json=body, retry_safe=method != "POST")


def _drive_sync(client, requests):
    """Runs a sans-IO generator of ``_shm.Request`` through the sync client; its return value."""
    try:
        request = next(requests)
        while True:
            try:
                answer = client._send(_shm_call(request))
            except OptimError as e:
                request = requests.throw(e)
            else:
                request = requests.send(answer)
    except StopIteration as done:
        return done.value


async def _drive_async(client, requests):
    try:
        request = next(requests)
        while True:
            try:
                answer = await client._send(_shm_call(request))
            except OptimError as e:
                request = requests.throw(e)
            else:
                request = requests.send(answer)
    except StopIteration as done:
        return done.value


def _refresh_call(session: "_SessionBase") -> _Call:
    headers = {"Optim-Wire-Dtype": session.layout.wire} if session.layout.wire else {}
    return _Call("GET", f"/v1/sessions/{session.id}/params?encoding=b64", headers=headers)


class _SessionBase:
    """A session handle: id, layout, the step count and params last seen."""

    def __init__(self, client, meta: dict, params: list[np.ndarray] | None = None, wire: str | None = None):
        self._client = client
        self.id: str = meta["id"]
        self.metadata = meta
        self.layout = _wire.Layout.from_metadata(meta, wire)
        self.step_count: int = meta["step"]
        self._params = params
        self._answers = _AnswerMemory(self.layout.nbytes)
        self.last_round: dict | None = None  # where the round stood after a contribution it did not complete

    @property
    def params(self):
        """The parameters after the last step (a dict if the session was made from one)."""
        return _wire.mirror(self._params, self.layout) if self._params is not None else None

    @property
    def aggregation(self) -> str:
        return self.metadata.get("aggregation", {}).get("mode", "each")

    def _push_fields(self, base_step: int | None) -> dict:
        """An asynchronous session's pushes say the step their gradients were computed on: by default
        that of the params this handle last received."""
        if self.aggregation != "async":
            return {}
        return {"base_step": self.step_count if base_step is None else base_step}

    def _round_answer(self, answer) -> Any:
        """A contribution's answer: the new params when its round committed, else None (and the
        round's standing in ``last_round``)."""
        if isinstance(answer, dict) and "params" not in answer:
            self.last_round = answer
            return None
        self.last_round = None
        return self._take(answer)

    def _take_shared(self, answer: dict, regions: _shm.SessionRegions, copy: bool, into: int) -> Any:
        self.step_count = answer["step"]
        self._params = regions.params(copy, self._answers, into)
        return self.params

    def _take(self, answer) -> Any:
        if isinstance(answer, httpx.Response):  # binary
            self.step_count = int(answer.headers["etag"].strip('W/"'))
            body = answer.extensions.pop(WRITABLE_BODY, None)  # what the transport read the body into
            if body is None:
                body = bytearray(answer.content)
            # httpx's Response and its stream refer to each other: only the cyclic GC would let go of
            # the body, and until then _AnswerMemory could not reuse it
            answer.stream = httpx.ByteStream(b"")
            self._params = _wire.from_binary(body, self.layout)
        else:
            self.step_count = answer["step"]
            self._params = _wire.from_json(answer["params"], self.layout)
        return self.params

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} step={self.step_count} dtype={self.layout.dtype}>"


class Session(_SessionBase):
    def step(self, gradients, loss: float | None = None, *, base_step: int | None = None, copy: bool = True):
        """Apply one optimizer step; returns the new params (numpy, mirroring what was sent). A named
        tensor's gradient may be None: that tensor skips this step, as in torch. On an asynchronous
        session the push states ``base_step`` (default: the step of the params last received).

        Through shared memory, ``copy=False`` returns the params as views of the region the server
        writes them into: updated in place by the next step, as torch updates parameters."""
        fields = self._push_fields(base_step)
        regions = _drive_sync(self._client, self._client._shm.regions(self.id, self.layout))
        into = 1 if regions is None else _drive_sync(self._client, self._client._shm.answer_to(regions, copy))
        call = _shm_step_call(self, regions, gradients, loss, fields, into)
        if call is not None:
            return self._take_shared(self._client._send(call), regions, copy, into)
        return self._take(self._client._send(_step_call(self, gradients, loss, fields)))

    def shared_buffers(self):
        """Arrays (mirroring the params) in the shared memory a step reads its gradients from, or
        None over the wire. Gradients written there (or accumulated: ``p.grad =
        torch.from_numpy(buffer)`` before ``backward``) and passed to ``step`` are not copied."""
        regions = _drive_sync(self._client, self._client._shm.regions(self.id, self.layout))
        return None if regions is None else _wire.mirror(regions.views(0), self.layout)

    def contribute(self, gradients, worker: str, *, weight: float | None = None, round: int | None = None,
                   loss: float | None = None, wait: float | None = None):
        """Add gradients to the open round of a session in synchronous rounds. Returns the new params
        if the round committed (this contribution completed it, or it did within ``wait`` seconds),
        else None, with the round's standing in ``last_round``."""
        fields = {"worker": worker, "weight": weight, "round": round}
        return self._round_answer(self._client._send(_step_call(self, gradients, loss, fields, wait)))

    def round(self) -> dict:
        """The open round: ``{"round", "received", "needed", "workers", "opened_at", "deadline"}``."""
        return self._client._send(_Call("GET", f"/v1/sessions/{self.id}/round"))

    def refresh(self):
        """Fetch the current step and params from the server."""
        return self._take(self._client._send(_refresh_call(self)))

    def state(self) -> dict:
        """A checkpoint document; ``client.restore(doc)`` resumes it bit-exactly."""
        return self._client._send(_Call("GET", f"/v1/sessions/{self.id}/state"))

    def delete(self) -> None:
        self._client._send(_Call("DELETE", f"/v1/sessions/{self.id}"))
        _drive_sync(self._client, self._client._shm.drop(self.id))


class AsyncSession(_SessionBase):
    async def step(self, gradients, loss: float | None = None, *, base_step: int | None = None, copy: bool = True):
        fields = self._push_fields(base_step)
        regions = await _drive_async(self._client, self._client._shm.regions(self.id, self.layout))
        into = 1 if regions is None else await _drive_async(self._client, self._client._shm.answer_to(regions, copy))
        call = _shm_step_call(self, regions, gradients, loss, fields, into)
        if call is not None:
            return self._take_shared(await self._client._send(call), regions, copy, into)
        return self._take(await self._client._send(_step_call(self, gradients, loss, fields)))

    async def shared_buffers(self):
        regions = await _drive_async(self._client, self._client._shm.regions(self.id, self.layout))
        return None if regions is None else _wire.mirror(regions.views(0), self.layout)

    async def contribute(self, gradients, worker: str, *, weight: float | None = None, round: int | None = None,
                         loss: float | None = None, wait: float | None = None):
        fields = {"worker": worker, "weight": weight, "round": round}
        return self._round_answer(await self._client._send(_step_call(self, gradients, loss, fields, wait)))

    async def round(self) -> dict:
        return await self._client._send(_Call("GET", f"/v1/sessions/{self.id}/round"))

    async def refresh(self):
        return self._take(await self._client._send(_refresh_call(self)))

    async def state(self) -> dict:
        return await self._client._send(_Call("GET", f"/v1/sessions/{self.id}/state"))

    async def delete(self) -> None:
        await self._client._send(_Call("DELETE", f"/v1/sessions/{self.id}"))
        await _drive_async(self._client, self._client._shm.drop(self.id))


class OptimClient(_Base):
    """``with OptimClient("http://127.0.0.1:8000") as client: session = client.create_session(...)``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 3, transport: httpx.BaseTransport | None = None,
                 shared_memory: bool = False):
        """``shared_memory=True``: on a server of this host with regions on (``OPTIM_SHM``), steps
        pass gradients and params through /dev/shm instead of the socket; elsewhere, or where the
        server refuses a region, they go over the wire (``shared_memory_refused`` says why)."""
        super().__init__(base_url, api_key, timeout, max_retries, shared_memory)
        self._http = httpx.Client(**self._http_options(), transport=transport or HTTPClientTransport())

    def _send(self, call: _Call):
        for attempt in range(self.max_retries + 1):
            try:
                with self._http.stream(call.method, self._url(call.path), **call.kwargs()) as response:
                    if _wants_body(response):
                        response.read()
            except httpx.TransportError as e:
                if (wait := self._retry(call, attempt, e, None)) is None:
                    raise _connection_error(e) from e
            else:
                if (wait := self._retry(call, attempt, None, response)) is None:
                    return _read(response)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def create_session(self, params, optimizer: str = "adam", *, dtype: str | None = None, schedule=None,
                       clip_grad_norm=None, param_groups=None, nan_policy=None, aggregation=None,
                       **hyperparameters) -> Session:
        """A new session; hyperparameters are torch's keyword names (``lr=1e-3, betas=(0.9, 0.99)``);
        ``aggregation={"mode": "sync", "contributions": 4}`` for several workers' rounds."""
        call, arrays = _create_call(params, optimizer, dtype, hyperparameters, schedule=schedule,
                                    clip_grad_norm=clip_grad_norm, param_groups=param_groups, nan_policy=nan_policy,
                                    aggregation=aggregation)
        return Session(self, self._send(call), arrays, _wire.infer_wire(params))

    def get_session(self, session_id: str, *, wire_dtype: str | None = None) -> Session:
        """An existing session; ``wire_dtype`` (float16, bfloat16) to exchange tensors in it."""
        session = Session(self, self._send(_Call("GET", f"/v1/sessions/{session_id}")), wire=wire_dtype)
        session.refresh()
        return session

    def restore(self, checkpoint: dict) -> Session:
        meta = self._send(_Call("POST", "/v1/sessions", json=checkpoint, retry_safe=False))
        session = Session(self, meta)
        session._take(meta)
        return session

    def list_sessions(self, limit: int = 100, after: str | None = None) -> dict:
        query = f"?limit={limit}" + (f"&after={after}" if after else "")
        return self._send(_Call("GET", f"/v1/sessions{query}"))

    def optimizers(self) -> list[dict]:
        return self._send(_Call("GET", "/v1/optimizers"))

    def close(self) -> None:
        _drive_sync(self, self._shm.drop_all())
        self._http.close()

    def __enter__(self) -> "OptimClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncOptimClient(_Base):
    """The async twin: ``async with AsyncOptimClient(url) as client: ...``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 3, transport: httpx.AsyncBaseTransport | None = None,
                 shared_memory: bool = False):
        super().__init__(base_url, api_key, timeout, max_retries, shared_memory)
        self._http = httpx.AsyncClient(**self._http_options(), transport=transport or AsyncHTTPClientTransport())

    async def _send(self, call: _Call):
        for attempt in range(self.max_retries + 1):
            try:
                async with self._http.stream(call.method, self._url(call.path), **call.kwargs(True)) as response:
                    if _wants_body(response):
                        await response.aread()
            except httpx.TransportError as e:
                if (wait := self._retry(call, attempt, e, None)) is None:
                    raise _connection_error(e) from e
            else:
                if (wait := self._retry(call, attempt, None, response)) is None:
                    return _read(response)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def create_session(self, params, optimizer: str = "adam", *, dtype: str | None = None, schedule=None,
                             clip_grad_norm=None, param_groups=None, nan_policy=None, aggregation=None,
                             **hyperparameters) -> AsyncSession:
        call, arrays = _create_call(params, optimizer, dtype, hyperparameters, schedule=schedule,
                                    clip_grad_norm=clip_grad_norm, param_groups=param_groups, nan_policy=nan_policy,
                                    aggregation=aggregation)
        return AsyncSession(self, await self._send(call), arrays, _wire.infer_wire(params))

    async def get_session(self, session_id: str, *, wire_dtype: str | None = None) -> AsyncSession:
        session = AsyncSession(self, await self._send(_Call("GET", f"/v1/sessions/{session_id}")), wire=wire_dtype)
        await session.refresh()
        return session

    async def restore(self, checkpoint: dict) -> AsyncSession:
        meta = await self._send(_Call("POST", "/v1/sessions", json=checkpoint, retry_safe=False))
        session = AsyncSession(self, meta)
        session._take(meta)
        return session

    async def list_sessions(self, limit: int = 100, after: str | None = None) -> dict:
        query = f"?limit={limit}" + (f"&after={after}" if after else "")
        return await self._send(_Call("GET", f"/v1/sessions{query}"))

    async def optimizers(self) -> list[dict]:
        return await self._send(_Call("GET", "/v1/optimizers"))

    async def aclose(self) -> None:
        await _drive_async(self, self._shm.drop_all())
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncOptimClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
