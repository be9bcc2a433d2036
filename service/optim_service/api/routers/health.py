"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...store import StoreUnavailable
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
async def readyz(sessions: Sessions, request: Request) -> dict:
    budget = request.app.state.settings.readyz_timeout_seconds
    try:  # a probe answers within its own budget, shorter than a store call's
        async with asyncio.timeout(budget):
            await sessions.store.ping()
    except TimeoutError:
        raise StoreUnavailable(f"the store did not answer a ping within {budget:g} s") from None
    return {"status": "ready"}
