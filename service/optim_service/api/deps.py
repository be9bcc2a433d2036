"""Dependencies shared by the routers, as ``Annotated`` aliases (async: FastAPI runs plain defs in a
thread). Every /v1 route takes one ``Caller``: resolving a single dependency per request is
measurably cheaper than several (bench/wire.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..sessions import SessionService
from .auth import Tenant, caller_of

__all__ = ["Caller", "Sessions", "Tenant", "caller_of"]


async def get_sessions(request: Request) -> SessionService:
    return request.app.state.sessions


async def get_caller(request: Request) -> Tenant:
    return await caller_of(request.app.state, request.headers.get("authorization"))


Sessions = Annotated[SessionService, Depends(get_sessions)]
Caller = Annotated[Tenant, Depends(get_caller)]
