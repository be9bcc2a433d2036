"""API keys: ``Authorization: Bearer <key>`` on every /v1 route when keys are configured.

Keys are held only as SHA-256 digests and compared in constant time against every configured
digest; a session's owner is a digest prefix, so neither the store nor the logs ever see a key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.datastructures import State

from ..errors import RateLimited, Unauthorized

if TYPE_CHECKING:
    from ..sessions import SessionService

CHALLENGE = 'Bearer realm="optim-service"'


def owner_of(key: str) -> str:
    """The tenant id stored with a key's sessions: not the key, not reversible to it."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyRing:
    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str:
        if not authorization:
            raise Unauthorized("send 'Authorization: Bearer <API key>'", headers={"WWW-Authenticate": CHALLENGE})
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("the Authorization header must be 'Bearer <API key>'",
                               headers={"WWW-Authenticate": CHALLENGE})
        digest = hashlib.sha256(key.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time taken says nothing about which key
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Unauthorized("this API key is not valid",
                               headers={"WWW-Authenticate": CHALLENGE + ', error="invalid_token"'})
        return owner_of(key)


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who is calling (None when API keys are off) and the sessions they act on."""

    owner: str | None
    sessions: SessionService


async def caller_of(state: State, authorization: str | None) -> Tenant:
    """Authenticates and rate-limits a request with this Authorization header (401/429), then names
    its tenant. ``state`` is the app's. (One coroutine: each one more cost a small step µs.)"""
    keys: KeyRing = state.keys
    if not keys.enabled:
        return state.anonymous
    owner = keys.owner(authorization)
    wait = await state.limiter.acquire(owner)
    if wait is not None:
        seconds = max(1, int(wait + 0.999))
        raise RateLimited(f"this API key is over its rate limit; retry in {seconds} s",
                          headers={"Retry-After": str(seconds)})
    return Tenant(owner, state.sessions)
