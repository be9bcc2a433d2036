"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ...errors import ServiceUnavailable
from ..deps import Sessions

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers")
async def readyz(sessions: Sessions) -> dict:
    try:
        await sessions.store.ping()
    except Exception as e:  # any store failure means "not ready", which is the answer asked for
        raise ServiceUnavailable(f"the session store does not answer: {type(e).__name__}") from None
    return {"status": "ready"}
