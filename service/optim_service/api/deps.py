"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..sessions import SessionService


async def get_sessions(request: Request) -> SessionService:  # async: FastAPI runs plain defs in a thread
    return request.app.state.sessions


async def get_owner(request: Request) -> str | None:
    """The tenant a request acts for (set by ``auth.authenticate``); None when keys are off."""
    return request.state.owner


Sessions = Annotated[SessionService, Depends(get_sessions)]
Owner = Annotated[str | None, Depends(get_owner)]
