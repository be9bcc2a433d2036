"""The store contract every backend honours; ``tests/test_store_contract.py`` checks it for each.

A store keeps opaque session records and never knows which optimizer they hold:

- ``create(record, caps=None)`` stores a new record; raises ``SessionExists`` if the id is taken, and
  ``CapReached`` if storing it would pass one of ``caps``, checked in the create's own transaction
  (its own script on Redis) so that concurrent creates from any number of processes never pass one.
- ``get(id, owner=ANY)`` returns the whole record (meta, data and version written together) or
  ``None``; given an owner, ``None`` also for another owner's record, found without reading its
  tensors, so that a foreign id costs what a missing one does.
- ``version(id)`` returns just the live record's version, or ``None``: cheap, for cache checks.
- ``compare_and_set(record, expected_version, claim=None, close_round=None)`` replaces the stored
  record only if its version is still ``expected_version`` and, when ``claim`` is given, that
  idempotency key is not yet claimed; with ``close_round`` (a round's version, 0 for none) it also
  requires the session's open round at that version and deletes it. Record, claim and round are
  written in one atomic step. Returns ``False`` when any check fails or the session is gone; the
  caller reloads and decides.
- ``compare_and_set(..., history=(entry, limit))`` also appends ``entry`` (bytes: one step's packed
  line, opaque to the store) to the session's history in the same atomic write, keeping the last ``limit`` entries and,
  of those it drops, every 10th (up to ``limit`` more): older steps downsampled.
  ``get_history(id)`` returns the kept entries, oldest first (a session's history goes with it).
  A ``private`` store may be given, instead of bytes, an entry whose bytes are made when first
  read (``history.Pending``): it keeps it as given and reads it (``bytes(entry)``) in ``get_history``.
- ``compare_and_set(..., snapshot=(step, keep))`` also keeps the new record as the snapshot of
  ``step``, after dropping any snapshot of that step or later, and keeps the newest ``keep``;
  ``get_snapshot(id, step)`` returns one (a record: meta and data) or ``None``;
  ``snapshot_steps(id)`` the steps kept, oldest first.
- ``get_round(id)`` returns the session's open round (``RoundRecord``: the running sum of its
  contributions and their bookkeeping) or ``None``; ``put_round(id, round, expected_version,
  claim=None)`` writes it only if the stored round is still at ``expected_version`` (0: none yet)
  and the session lives, with ``claim`` in the same atomic step. A session's round goes with it.
- ``get_claim(id, key)`` returns a live (unexpired) claim or ``None``.
- ``delete(id)`` returns whether a record was deleted; its claims are never returned again.
- ``list(owner, limit, after)`` returns up to ``limit`` live records of ``owner`` with id > ``after``,
  ordered by id; their ``data`` may be empty (listing never needs tensors).
- ``count()`` is the number of live sessions; ``count_owned(owner)`` of one owner's.
- ``private`` is True when no other process writes these records (the memory store): a step that
  holds its session's lock in this process then cannot lose its compare-and-set.
- Sessions idle (not written) for ``session_ttl_seconds`` expire (0: never) and are then absent from
  every method; ``sweep()`` reclaims their space where the backend does not do it by itself.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    owner: str | None
    version: int
    meta: bytes  # JSON: schema version, training config, layout, timestamps
    data: bytes | memoryview  # every tensor's raw little-endian bytes, in the order meta's layout gives


@dataclass(frozen=True, slots=True)
class Claim:
    """An Idempotency-Key's record: which request body claimed it, the record version it wrote and
    the optimizer step that version holds."""

    key: str
    body_digest: str  # sessions.body_digest of the request that claimed it
    version: int
    step: int
    ttl_seconds: int


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # get()'s owner when any owner's record will do (the store's own use)


def record_bytes(record: SessionRecord) -> int:
    """What a record counts against the byte budgets: its tensors and its metadata."""
    return len(record.data) + len(record.meta)


@dataclass(frozen=True, slots=True)
class Caps:
    """The limits a create must stay within. Owner ``None`` (API keys off) has no per-owner caps;
    ``total_bytes`` binds only a store whose memory is this process's (the memory store);
    ``reserve`` is what each session may grow by besides its record (its bounded history)."""

    sessions: int
    sessions_per_owner: int
    bytes_per_owner: int
    total_bytes: int | None = None
    reserve: int = 0


class CapReached(Exception):
    """A create refused by a cap: which one, its limit, what is used now and what was asked."""

    def __init__(self, cap: str, limit: int, used: int, needed: int = 1):
        super().__init__(f"{cap}: {used} of {limit} used, {needed} asked")
        self.cap, self.limit, self.used, self.needed = cap, limit, used, needed


class SessionExists(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """A synchronous round in progress: ``meta`` (JSON: round number, workers, weights, times) and
    ``data`` (the weighted sum of the contributions so far, laid out as the session's params)."""

    version: int  # from 1; every contribution bumps it
    meta: bytes
    data: bytes | memoryview


class StoreUnavailable(Exception):
    """The backend cannot be reached or is busy; the request changed nothing and may be retried."""


class OutcomeUnknown(StoreUnavailable):
    """A write the backend did not confirm in time: it may have been applied or not. Only an
    Idempotency-Key makes its retry safe."""


HISTORY_DOWNSAMPLE = 10  # of the entries a history drops, it keeps every 10th
WRITES = frozenset({"create", "compare_and_set", "delete", "put_round"})


class StoreWrapper:
    """A store whose every coroutine method is ``inner``'s, wrapped by ``wrap(name, method)``; the
    wrapper is built on first use and set on the instance, so later lookups skip ``__getattr__``."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        wrapped = self.wrap(name, attr)
        setattr(self, name, wrapped)
        return wrapped

    def wrap(self, name: str, method):
        raise NotImplementedError


class BoundedStore(StoreWrapper):
    """Every call of ``inner`` ends within ``seconds``, whatever its client library waits: past
    that, a read raises ``StoreUnavailable`` and a write ``OutcomeUnknown``."""

    def __init__(self, inner, seconds: float):
        super().__init__(inner)
        self.private = inner.private
        self._seconds = seconds

    def wrap(self, name: str, attr):
        write = name in WRITES

        async def bounded(*args, **kwargs):
            try:
                async with asyncio.timeout(self._seconds):
                    return await attr(*args, **kwargs)
            except TimeoutError:
                error = OutcomeUnknown if write else StoreUnavailable
                raise error(f"the store did not answer {name} within {self._seconds:g} s") from None
            except StoreUnavailable as e:
                if write and not isinstance(e, OutcomeUnknown):
                    raise OutcomeUnknown(str(e)) from e
                raise

        return bounded


def wrap_methods(cls, around, skip: tuple[str, ...] = ()):
    """Replace each public coroutine method of ``cls`` (but ``skip``) by ``around(method)``."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or name in skip or not inspect.iscoroutinefunction(fn):
            continue
        method = around(fn)
        method.__name__, method.__doc__ = fn.__name__, fn.__doc__
        setattr(cls, name, method)
    return cls


def translate_errors(*backend_errors: type[BaseException]):
    """Decorate a store's async methods so its backend's outage errors become ``StoreUnavailable``."""
    def around(fn):
        async def method(self, *args, **kwargs):
            try:
                return await fn(self, *args, **kwargs)
            except backend_errors as e:
                raise StoreUnavailable(f"{type(e).__name__}: {e}") from e
        return method
    return lambda cls: wrap_methods(cls, around)


class SessionStore(Protocol):
    private: bool

    async def create(self, record: SessionRecord, caps: Caps | None = None) -> None: ...
    async def get(self, session_id: str, owner: str | None | _Any = ANY) -> SessionRecord | None: ...
    async def version(self, session_id: str) -> int | None: ...
    async def compare_and_set(
        self, record: SessionRecord, expected_version: int, claim: Claim | None = None,
        close_round: int | None = None, history: tuple[bytes, int] | None = None,
        snapshot: tuple[int, int] | None = None,
    ) -> bool: ...
    async def get_history(self, session_id: str) -> list[bytes]: ...
    async def get_snapshot(self, session_id: str, step: int) -> SessionRecord | None: ...
    async def snapshot_steps(self, session_id: str) -> list[int]: ...
    async def get_round(self, session_id: str) -> RoundRecord | None: ...
    async def put_round(
        self, session_id: str, round: RoundRecord, expected_version: int, claim: Claim | None = None
    ) -> bool: ...
    async def get_claim(self, session_id: str, key: str) -> Claim | None: ...
    async def delete(self, session_id: str) -> bool: ...
    async def list(self, owner: str | None, limit: int, after: str | None) -> list[SessionRecord]: ...
    async def count(self) -> int: ...
    async def count_owned(self, owner: str | None) -> int: ...
    async def sweep(self) -> int: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...
