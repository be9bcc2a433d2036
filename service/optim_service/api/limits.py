"""Limits enforced before a body is trusted: its size while it streams, and its JSON nesting depth."""

from __future__ import annotations

import numpy as np
import orjson

from ..errors import InvalidRequest, PayloadTooLarge

_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413: at once when Content-Length says so, and while
    reading when a chunked body runs past it, counting the bytes actually received. (The server
    reads a body of declared length no further than that length: the bytes after it are the next
    request, so such a body needs no counting.)"""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await _send_413(send, self.max_bytes)
            return await self.app(scope, receive, send)  # HTTP/1.1 framing: no more than declared arrives
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(_too_large(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return (f"the body is over this service's limit of {limit} bytes; send large tensors as "
            "application/octet-stream, or ask the operator to raise OPTIM_MAX_BODY_BYTES")


async def _send_413(send, limit: int) -> None:
    body = orjson.dumps({"type": "about:blank", "title": "Request body too large", "status": 413,
                         "detail": _too_large(limit)})
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def check_json_depth(body: bytes, limit: int) -> None:
    """Nesting of arrays/objects, outside strings, counted over the raw bytes in one numpy pass."""
    if body.count(b"[") + body.count(b"{") <= limit:  # cannot nest deeper than it has brackets
        return
    raw = np.frombuffer(body, np.uint8)
    if raw.size == 0:
        return
    quotes = raw == ord('"')
    if quotes.any():
        # a quote is escaped when an odd run of backslashes precedes it
        backslash = (raw == ord("\\")).astype(np.int64)
        run = np.cumsum(backslash)
        reset = np.maximum.accumulate(np.where(backslash == 0, run, 0))
        preceding = np.concatenate(([0], (run - reset)[:-1]))
        quotes &= preceding % 2 == 0
        inside = (np.cumsum(quotes) - quotes) % 2 == 1
        steps = np.where(inside, 0, _OPEN[raw])
    else:
        steps = _OPEN[raw]
    if int(np.cumsum(steps, dtype=np.int64).max()) > limit:
        raise InvalidRequest(f"JSON nested deeper than {limit} levels")
