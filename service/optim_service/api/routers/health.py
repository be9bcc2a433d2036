"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import Sessions
from ..schemas import PROBLEMS

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up",
            responses={200: {"description": "OK", "content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers (503 otherwise)",
            responses={200: {"description": "OK", "content": {"application/json": {"example": {"status": "ready"}}}},
                       503: PROBLEMS[503]})
async def readyz(sessions: Sessions) -> dict:
    await sessions.store.ping()
    return {"status": "ready"}
