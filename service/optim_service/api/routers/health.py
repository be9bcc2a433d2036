"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import Sessions

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers (503 otherwise)")
async def readyz(sessions: Sessions) -> dict:
    await sessions.store.ping()
    return {"status": "ready"}
