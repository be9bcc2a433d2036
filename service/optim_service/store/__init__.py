"""Session stores behind one contract (see ``base``), opened from a URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from .base import (
    ANY, BoundedStore, CapReached, Caps, Claim, OutcomeUnknown, SessionExists, SessionRecord, SessionStore,
    StoreUnavailable,
)
from .cached import CachedStore
from .memory import MemoryStore


def open_store(url: str, session_ttl_seconds: int = 0, cache_bytes: int = 0,
               timeout_seconds: float | None = None) -> SessionStore:
    """``memory``, ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (``?synchronous=full``),
    ``redis://host:port/db`` (and ``rediss://`` for TLS). ``cache_bytes`` > 0 puts a version-checked
    local cache of that size in front of SQLite and Redis. ``timeout_seconds`` bounds every call
    (``BoundedStore``), and the backend's own waits (SQLite's busy timeout, Redis's socket timeouts)."""
    store = _open(url, session_ttl_seconds, timeout_seconds or 5.0)
    if cache_bytes > 0 and not isinstance(store, MemoryStore):
        store = CachedStore(store, cache_bytes)
    if timeout_seconds is not None and not isinstance(store, MemoryStore):  # its calls never wait
        store = BoundedStore(store, timeout_seconds)
    return store


def _open(url: str, session_ttl_seconds: int, timeout_seconds: float) -> SessionStore:
    if url == "memory":
        return MemoryStore(session_ttl_seconds)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from .sqlite import SQLiteStore

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ValueError(f"store URL {url!r} names no file; use sqlite:///data/optim.db")
        synchronous = parse_qs(parts.query).get("synchronous", ["normal"])[0]
        return SQLiteStore(path, session_ttl_seconds, synchronous, timeout_seconds)
    if parts.scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url, session_ttl_seconds, timeout_seconds=timeout_seconds)
    raise ValueError(f"unsupported store URL {url!r}; use memory, sqlite:///path or redis://host:port/db")


__all__ = ["ANY", "BoundedStore", "CachedStore", "CapReached", "Caps", "Claim", "MemoryStore", "OutcomeUnknown",
           "SessionExists", "SessionRecord", "SessionStore", "StoreUnavailable", "open_store"]
