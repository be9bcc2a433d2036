"""Python SDK for optim-service: numpy in, numpy out, the same numbers as torch.optim.

    with OptimClient("http://127.0.0.1:8000") as client:
        session = client.create_session({"w": w, "b": b}, optimizer="adam", lr=1e-3)
        params = session.step({"w": grad_w, "b": grad_b})
"""

from ._client import AsyncOptimClient, AsyncSession, OptimClient, Session
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    OptimError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    RateLimitError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "APIConnectionError", "APIStatusError", "APITimeoutError", "AsyncOptimClient", "AsyncSession",
    "AuthenticationError", "BadRequestError", "ConflictError", "InternalServerError", "NotFoundError",
    "OptimClient", "OptimError", "PayloadTooLargeError", "PermissionDeniedError",
    "PreconditionFailedError", "RateLimitError", "Session", "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
]
