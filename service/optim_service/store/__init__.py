"""Session stores behind one contract (see ``base``), opened from a URL."""

from __future__ import annotations

from .base import Claim, SessionExists, SessionRecord, SessionStore
from .memory import MemoryStore


def open_store(url: str) -> SessionStore:
    """``memory`` today; ``sqlite:///path`` and ``redis://host:port/db`` plug in here."""
    if url == "memory":
        return MemoryStore()
    raise ValueError(f"unsupported store URL {url!r}; expected 'memory'")


__all__ = ["Claim", "MemoryStore", "SessionExists", "SessionRecord", "SessionStore", "open_store"]
