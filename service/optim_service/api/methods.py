"""HEAD, answered as the GET it asks about.

RFC 9110 has every general-purpose server support HEAD, and FastAPI's routes take only the methods
they name: a load balancer's ``HEAD /healthz`` got a 405. The route runs as GET; the server, whose
own scope still says HEAD, sends the answer's headers without its body.
"""

from __future__ import annotations


class HeadAsGet:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
