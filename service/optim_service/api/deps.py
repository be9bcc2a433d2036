"""Dependencies shared by the routers, as ``Annotated`` aliases (async: FastAPI runs plain defs in a
thread). Every /v1 route takes one ``Caller``: resolving a single dependency per request is
measurably cheaper than several (bench/wire.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import State

from ..sessions import SessionService
from .auth import authenticate


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who is calling (None when API keys are off) and the sessions they act on."""

    owner: str | None
    sessions: SessionService


async def get_sessions(request: Request) -> SessionService:
    return request.app.state.sessions


async def caller_of(state: State, authorization: str | None) -> Tenant:
    """Authenticates and rate-limits a request with this Authorization header (401/429), then names
    its tenant. ``state`` is the app's."""
    return Tenant(await authenticate(state, authorization), state.sessions)


async def get_caller(request: Request) -> Tenant:
    return await caller_of(request.app.state, request.headers.get("authorization"))


Sessions = Annotated[SessionService, Depends(get_sessions)]
Caller = Annotated[Tenant, Depends(get_caller)]
