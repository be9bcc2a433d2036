"""Typed exceptions, keyed by HTTP status; each carries the server's problem+json ``detail``."""

from __future__ import annotations


class OptimError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(OptimError):
    """The server could not be reached (after retries)."""


class APITimeoutError(APIConnectionError):
    """The request timed out (after retries)."""


class APIStatusError(OptimError):
    """The server answered with an error status; ``detail`` says what to change."""

    def __init__(self, status: int, detail: str, problem: dict | None = None):
        super().__init__(f"{status}: {detail}")
        self.status_code = status
        self.detail = detail
        self.problem = problem or {}


class BadRequestError(APIStatusError): ...
class AuthenticationError(APIStatusError): ...
class PermissionDeniedError(APIStatusError): ...
class NotFoundError(APIStatusError): ...
class ConflictError(APIStatusError): ...
class PreconditionFailedError(APIStatusError): ...
class PayloadTooLargeError(APIStatusError): ...
class UnsupportedMediaTypeError(APIStatusError): ...
class UnprocessableEntityError(APIStatusError): ...
class RateLimitError(APIStatusError): ...
class InternalServerError(APIStatusError): ...


BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def for_status(status: int, detail: str, problem: dict | None = None) -> APIStatusError:
    cls = BY_STATUS.get(status, InternalServerError if status >= 500 else APIStatusError)
    return cls(status, detail, problem)
