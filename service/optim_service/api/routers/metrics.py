"""/metrics: Prometheus text format, from this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import Sessions

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics: step latency, steps, errors, sessions, store latency",
            response_class=Response, responses={200: {"description": "OK", "content": {"text/plain": {"example": (
                '# TYPE optim_steps_total counter\n'
                'optim_steps_total{optimizer="adam",outcome="applied"} 1280.0\n')}}}})
async def metrics(request: Request, sessions: Sessions) -> Response:
    registry = request.app.state.metrics
    registry.sessions.set(await sessions.store.count())
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
