"""The domain's errors: everything a client can get wrong, each mapped to one HTTP status by the API.

Anything that is not an ``OptimServiceError`` is a bug and is left to surface as one.
"""

from __future__ import annotations


class OptimServiceError(Exception):
    """Base class; ``detail`` is a sentence a person can act on."""

    title = "Request failed"

    def __init__(self, detail: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class InvalidRequest(OptimServiceError):
    title = "Invalid request"


class SessionNotFound(OptimServiceError):
    title = "Session not found"


class VersionMismatch(OptimServiceError):
    title = "Session is at another step"


class IdempotencyKeyReused(OptimServiceError):
    title = "Idempotency-Key reused with another request"


class StepConflict(OptimServiceError):
    title = "Conflicting step"


class TooManySessions(OptimServiceError):
    title = "Too many sessions"


class QuotaExceeded(OptimServiceError):
    title = "Storage quota exceeded"


class SessionBusy(OptimServiceError):
    title = "Session busy"


class Unauthorized(OptimServiceError):
    title = "Missing or invalid API key"


class PayloadTooLarge(OptimServiceError):
    title = "Request body too large"


class RateLimited(OptimServiceError):
    title = "Too many requests"


class UnsupportedMediaType(OptimServiceError):
    title = "Unsupported media type"


class NotAcceptable(OptimServiceError):
    title = "Not acceptable"


class RegionNotFound(OptimServiceError):
    title = "Shared-memory region not found"


class RegionExists(OptimServiceError):
    title = "Shared-memory region already registered"


class TooManyRegions(OptimServiceError):
    title = "Too many shared-memory regions"


class FeatureOff(OptimServiceError):
    title = "Turned off on this server"


class AnswerUndelivered(OptimServiceError):
    title = "Step applied, answer not delivered"
