"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..sessions import SessionService


def get_sessions(request: Request) -> SessionService:
    return request.app.state.sessions


def get_owner(request: Request) -> str | None:
    """The tenant a request acts for; every session belongs to one. API keys set it (issue #4)."""
    return None


Sessions = Annotated[SessionService, Depends(get_sessions)]
Owner = Annotated[str | None, Depends(get_owner)]
