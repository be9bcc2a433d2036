"""RFC 9457 problem+json for every error: domain errors by type, validation errors, and HTTP errors.

Only errors we know are mapped; anything else is a bug and surfaces as Starlette's plain 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import errors
from ..store import OutcomeUnknown, StoreUnavailable
from .responses import JSONResponse

logger = logging.getLogger("optim_service")

STATUS: dict[type[errors.OptimServiceError], int] = {
    errors.InvalidRequest: 422,
    errors.SessionNotFound: 404,
    errors.VersionMismatch: 412,
    errors.IdempotencyKeyReused: 422,
    errors.StepConflict: 409,
    errors.TooManySessions: 429,
    errors.QuotaExceeded: 429,
    errors.SessionBusy: 503,
    errors.Unauthorized: 401,
    errors.PayloadTooLarge: 413,
    errors.RateLimited: 429,
    errors.UnsupportedMediaType: 415,
    errors.NotAcceptable: 406,
    errors.RegionNotFound: 404,
    errors.RegionExists: 409,
    errors.TooManyRegions: 429,
    errors.FeatureOff: 403,
    errors.AnswerUndelivered: 409,
}
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def describe_validation_errors(errs) -> str:
    """pydantic's errors as one sentence: 'optimizer.lr: Input should be a valid number; ...'."""
    parts = []
    for err in errs:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> set[str]:
    """The methods a route takes at this path, each tried through the routes' own matching: an
    included router's routes sit behind one route that names no methods of its own. HEAD goes
    where GET does (``methods.HeadAsGet``)."""
    allowed = {method for method in METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)}
    return allowed | {"HEAD"} if "GET" in allowed else allowed


def install(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: errors.OptimServiceError):
        status = STATUS[type(exc)]
        headers = dict(exc.headers)
        if "step" in exc.extra:
            headers["ETag"] = f'"{exc.extra["step"]}"'
        return problem(status, exc.title, exc.detail, headers=headers, **exc.extra)

    async def validation_error(request: Request, exc: RequestValidationError):
        errs = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return problem(422, "Invalid request", describe_validation_errors(errs), errors=errs)

    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        detail = str(exc.detail)
        if exc.status_code == 405:  # Starlette names only the first route's methods; name them all
            allowed = ", ".join(sorted(allowed_methods(request)))
            headers["Allow"] = allowed
            detail = f"{request.method} is not allowed on {request.scope['path']}; it takes {allowed}"
        return problem(exc.status_code, exc.detail if isinstance(exc.detail, str) else "Error", detail, headers=headers)

    async def store_unavailable(request: Request, exc: StoreUnavailable):
        # the client's answer names no backend detail; the operator's log does
        logger.warning("%s %s: store unavailable (%s)", request.method, request.url.path, exc)
        if isinstance(exc, OutcomeUnknown):
            return problem(503, "Store did not confirm",
                           "the session store did not confirm this write in time, so it may or may not "
                           "have been applied; retry with the same Idempotency-Key (a step is then applied "
                           "at most once), or GET the session to see its step",
                           headers={"Retry-After": "1"})
        return problem(503, "Store unavailable",
                       "the session store is not answering; nothing was changed, retry shortly",
                       headers={"Retry-After": "1"})

    for cls in STATUS:
        app.add_exception_handler(cls, domain_error)
    app.add_exception_handler(StoreUnavailable, store_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
