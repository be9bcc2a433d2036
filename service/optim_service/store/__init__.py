"""Session stores behind one contract (see ``base``), opened from a URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit, urlunsplit

from .base import (
    ANY, BoundedStore, CapReached, Caps, Claim, OutcomeUnknown, RoundRecord, SessionExists, SessionRecord,
    SessionStore, StoreUnavailable,
)
from .cached import CachedStore
from .memory import MemoryStore


def open_store(url: str, session_ttl_seconds: int = 0, cache_bytes: int = 0,
               timeout_seconds: float | None = None, redis_wait_replicas: int = 0) -> SessionStore:
    """``memory``, ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (``?synchronous=full``),
    ``redis://host:port/db`` (and ``rediss://`` for TLS), ``redis+cluster://host:port[,host:port...]``
    (``rediss+cluster://``; ``redis_wait_replicas``: see ``RedisStore``). ``cache_bytes`` > 0 puts a version-checked
    local cache of that size in front of SQLite and Redis. ``timeout_seconds`` bounds every call
    (``BoundedStore``), and the backend's own waits (SQLite's busy timeout, Redis's socket timeouts)."""
    store = _open(url, session_ttl_seconds, timeout_seconds or 5.0, redis_wait_replicas)
    if cache_bytes > 0 and not isinstance(store, MemoryStore):
        store = CachedStore(store, cache_bytes)
    if timeout_seconds is not None and not isinstance(store, MemoryStore):  # its calls never wait
        store = BoundedStore(store, timeout_seconds)
    return store


def sqlite_path(url: str) -> str:
    """The file a ``sqlite:`` URL names, as SQLAlchemy reads them: ``sqlite:///relative/path``,
    ``sqlite:////absolute/path``, and also ``sqlite:/absolute/path`` and ``sqlite:relative/path``.
    A host (``sqlite://host/...``) means nothing to a file: ValueError."""
    parts = urlsplit(url)
    rest = url[len("sqlite:"):].split("?", 1)[0]
    if rest.startswith("//"):
        if parts.netloc:
            raise ValueError(f"store URL {url!r} names a host, which SQLite has none of; use "
                             "sqlite:///relative/path or sqlite:////absolute/path")
        path = rest[3:]  # sqlite:///x is relative x; sqlite:////x is /x
    else:
        path = rest  # sqlite:/x is /x, sqlite:x is x
    if not path or path.endswith("/"):
        raise ValueError(f"store URL {url!r} names no file; use sqlite:///data/optim.db")
    return path


def check_url(url: str) -> None:
    """ValueError, with a sentence saying what is wrong, for a URL ``open_store`` cannot open."""
    if url == "memory":
        return
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        sqlite_path(url)
    elif scheme in ("redis+cluster", "rediss+cluster"):
        from .redis import cluster_nodes

        cluster_nodes(url)
    elif scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported store URL {redact(url)!r}; use memory, sqlite:///path, redis://host:port/db "
                         "or redis+cluster://host:port[,host:port...]")


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def _open(url: str, session_ttl_seconds: int, timeout_seconds: float, redis_wait_replicas: int = 0) -> SessionStore:
    check_url(url)
    if url == "memory":
        return MemoryStore(session_ttl_seconds)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from .sqlite import SQLiteStore

        synchronous = parse_qs(parts.query).get("synchronous", ["normal"])[0]
        return SQLiteStore(sqlite_path(url), session_ttl_seconds, synchronous, timeout_seconds)
    from .redis import RedisStore

    return RedisStore(url, session_ttl_seconds, timeout_seconds=timeout_seconds, wait_replicas=redis_wait_replicas)


__all__ = ["ANY", "BoundedStore", "CachedStore", "CapReached", "Caps", "Claim", "MemoryStore", "OutcomeUnknown",
           "RoundRecord",
           "SessionExists", "SessionRecord", "SessionStore", "StoreUnavailable", "check_url", "open_store", "redact",
           "sqlite_path"]
