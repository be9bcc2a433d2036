"""The hottest route served straight from ASGI: ``POST /v1/sessions/{id}/step``.

The router, the exception middleware, the per-request exit stack and the endpoint wrapper cost a
small step ~15 µs of its ~175 in a tight in-process loop, more with cold caches behind a socket
(bench/wire.py measures the whole step end to end). This lane sits innermost among the middlewares, so request ids, access logs, CORS and the body
limit still apply, and answers errors with the app's own exception handlers. Every other request,
and a step with another method (405), goes on to the router; the APIRoute there documents the step.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from .deps import get_caller

STEP_PATH = re.compile(r"/v1/sessions/([^/]+)/step")


class StepLane:
    def __init__(self, app, step):
        self.app = app
        self.step = step  # async (session_id, request, caller) -> Response

    async def __call__(self, scope, receive, send):
        match = scope["type"] == "http" and scope["method"] == "POST" and STEP_PATH.fullmatch(
            scope["path"].removeprefix(scope.get("root_path", "")))
        if not match:
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            response = await self.step(match[1], request, await get_caller(request))
        except Exception as exc:
            handler = _handler_for(scope["app"].exception_handlers, exc)
            if handler is None:
                raise  # a bug: the server error middleware answers 500
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler_for(handlers: dict, exc: Exception):
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
