"""The one place a step happens: load → validate → update → save-if-version-unchanged.

Steps on one session are serialised in this process by a per-session lock; across processes the
store's compare-and-set is the fence, and a lost race reloads and recomputes (bounded), so no
update is ever lost or applied twice. Nothing is written until the new state is known to be finite.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import NamedTuple

import blake3
import numpy as np
from pydantic import ValidationError

from . import history
from .diagnosis import smoothed
from .errors import (
    IdempotencyKeyReused,
    InvalidRequest,
    QuotaExceeded,
    SessionBusy,
    SessionNotFound,
    StepConflict,
    TooManySessions,
    VersionMismatch,
)
from .finite import first_non_finite, require_finite
from .lru import ByteBoundedLRU
from .optim.config import TrainingConfig, apply_step, bound_step, measure
from .optim.base import Run, Top, joined
from .optim.kernels import UNGUARDED, max_abs
from .optim.schedules import ScheduleOverflow
from .rounds import Contribution, Round, RoundStatus
from .record import POOL, Layout, Session, from_record, parse_config, read_meta
from .record import _hyperparameters as hyperparameters_of
from .settings import Settings
from .store import CapReached, Caps, Claim, SessionExists, SessionRecord, SessionStore

logger = logging.getLogger("optim_service")
GradientDecoder = Callable[[Session], Sequence[np.ndarray]]  # a list, or a Run of one body


class StepResult(NamedTuple):
    session: Session
    grad_norm: float | None
    compute_ms: float
    replayed: bool = False
    skipped: bool = False
    pending: RoundStatus | None = None  # a contribution taken into a round still open (202)
    lr_scale: float | None = None  # an asynchronous push's staleness scale
    staleness: int | None = None
    round: int | None = None  # the round this step committed
    dry_run: bool = False  # computed and answered, written nowhere
    in_place: bool = False  # the update wrote the stored state itself
    answered: bool = False  # and the new parameters into ``step``'s ``answer_into`` as well
    # what is left once the answer is out, with ``step(..., settle_later=True)``: the committed
    # session frozen and kept warm, waiters on its rounds woken (``SessionService._settle``)
    settle: Callable[[], None] | None = None


def new_session_id() -> str:
    """128 random bits, URL-safe, never starting with "-": a command line (``optim-service sessions
    show ID``, curl, a shell tool) would read such an id as an option."""
    while (session_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return session_id


def body_digest(content_type: str, body: bytes) -> str:
    """What an Idempotency-Key recognises its request by. BLAKE3 is as collision-proof as SHA-256
    and ~4× faster here (4 MB: 0.7 ms against 2.7, on the critical path of every keyed step)."""
    digest = body_hasher(content_type)
    digest.update(body)  # no concatenated copy of a large body
    return digest_of(digest)


def body_hasher(content_type: str):
    """``body_digest`` a piece at a time: ``update`` it with the body's pieces, then ``digest_of``."""
    return blake3.blake3(content_type.encode() + b"\0")


def digest_of(hasher) -> str:
    return "blake3=" + hasher.hexdigest()


class WarmSessions:
    """The last state this process read or wrote of each hot session, already decoded, keyed by id
    and checked against the stored record's version: a step forks it instead of parsing the record
    again. An entry shares its bytes with the record it came from (with the memory store and the
    local cache, the very same buffer), and is evicted least-recently-used beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self._sessions: ByteBoundedLRU[Session] = ByteBoundedLRU(max_bytes)

    def template(self, record: SessionRecord) -> Session:
        """The decoded, read-only session that ``record`` holds: fork it to step."""
        warm = self._sessions.get(record.id)
        if warm is None or warm.version != record.version:
            warm = from_record(record, private=False)
            self.remember(warm)
        return warm

    def get(self, session_id: str) -> Session | None:
        """The warm session of this id, of whatever version (its layout never changes)."""
        return self._sessions.get(session_id)

    def remember(self, session: Session) -> None:
        previous = self._sessions.put(session.id, session, len(session.buffer))
        if previous is not None and previous.buffer is not session.buffer:
            recycle(previous.buffer)

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id)

    def ids(self) -> list[str]:
        return self._sessions.keys()


def recycle(buffer: np.ndarray) -> None:
    """Give ``buffer`` to the pool, reused once nothing else holds it, let go of when no step takes
    it soon: a finished working copy, or the memory an update in place read its gradients from."""
    if POOL.give(buffer):
        try:
            asyncio.get_running_loop().call_later(POOL.idle_seconds + 0.05, POOL.trim)
        except RuntimeError:  # no loop (a test driving sessions by hand): trimmed at the next give
            POOL.trim()


class Turns:
    """Each session's turn in this process: who has it and who waits, first come first served. A
    session no one holds has no entry, so idle sessions hold nothing. A free turn is taken by a
    plain call (``take``): an asyncio.Lock under an ``async with`` cost a small step three
    coroutines, a few µs each over the wire."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        # per session held: its waiters, each a future that resolves when the turn passes to it
        self._queues: dict[str, deque[asyncio.Future]] = {}

    def held(self) -> list[str]:
        return list(self._queues)

    def take(self, session_id: str) -> asyncio.Future | None:
        """The turn now (None), or a future that resolves when it passes to this caller (``wait``)."""
        queue = self._queues.get(session_id)
        if queue is None:
            self._queues[session_id] = deque()
            return None
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        return turn

    async def wait(self, session_id: str, turn: asyncio.Future) -> None:
        """Until ``turn`` comes: a step behind a stalled one gives up within one store timeout
        (SessionBusy), not one per step ahead. A caller that gives up as its turn comes passes it on."""
        try:
            async with asyncio.timeout(self.timeout):
                await turn
        except BaseException as e:
            if turn.done() and not turn.cancelled():
                self.leave(session_id)
            if isinstance(e, TimeoutError):
                raise SessionBusy(
                    f"the steps ahead of this one on session '{session_id}' did not finish within "
                    f"{self.timeout:g} s; nothing was changed, retry shortly", headers={"Retry-After": "1"}) from None
            raise

    def leave(self, session_id: str) -> None:
        """Pass the turn to the first caller still waiting, or let the session go."""
        queue = self._queues[session_id]
        while queue:
            turn = queue.popleft()
            if not turn.done():  # (a waiter that gave up left its future cancelled)
                turn.set_result(None)
                return
        del self._queues[session_id]


class _Turn:
    """``async with`` a session's turn (``Turns``), for the calls less hot than a step's."""

    __slots__ = ("turns", "session_id")

    def __init__(self, turns: Turns, session_id: str):
        self.turns, self.session_id = turns, session_id

    async def __aenter__(self) -> None:
        turn = self.turns.take(self.session_id)
        if turn is not None:
            await self.turns.wait(self.session_id, turn)

    async def __aexit__(self, *exc) -> None:
        self.turns.leave(self.session_id)


class SessionService:
    def __init__(self, store: SessionStore, settings: Settings):
        self.store = store
        self.settings = settings
        # per session with a step running or waiting (a WeakValueDictionary of locks made a weak
        # reference and its callback on every step, ~9 µs)
        self._turns = Turns(settings.store_timeout_seconds)
        # with a private store a warm session is the stored record itself, costing nothing more: bounded
        # by the store, it stays warm however large (an evicted one paid fresh memory every step)
        self._warm = WarmSessions(sys.maxsize if store.private else settings.cache_bytes)
        self._waiting: dict[str, asyncio.Event] = {}  # sessions a contributor waits on to commit
        # sessions whose stored memory an update in place is writing until it commits, and the future
        # readers wait on (made by the first); dry runs reading a session's memory, by id
        self._writing: dict[str, asyncio.Future | None] = {}
        self._dry_runs: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # rounds with a deadline, to commit then
        self._tasks: set[asyncio.Task] = set()
        self.caps = Caps(settings.max_sessions, settings.max_sessions_per_key, settings.max_bytes_per_key,
                         settings.memory_store_max_bytes or _half_the_memory())

    def binary_memory(self, owner: str | None, session_id: str, nbytes: int) -> np.ndarray | None:
        """Memory for a binary step's working copy, to read the body into. The body's gradients then
        lie where the new parameters go, and each kernel reads an element's gradient before writing
        its parameter there: a step holds the state and one working copy of it, not also the body
        (a 10M-parameter Adam step: 3 parameter-sized copies above the session, not 4). Only for a
        session warm here whose parameters take exactly ``nbytes``, on a private store: there a step
        holding the session's lock cannot lose its compare-and-set, which would need the gradients
        again. Otherwise None, and the body is read on its own."""
        warm = self._warm.get(session_id) if self.store.private else None
        if warm is None or warm.owner != owner or warm.layout.nbytes != nbytes:
            return None
        if warm.config.aggregation.mode == "sync":  # a contribution's gradients outlive its request, in the round
            return None
        return POOL.take(len(warm.buffer))

    async def create(
        self,
        owner: str | None,
        config: TrainingConfig,
        layout: Layout,
        params: list[np.ndarray],
        restored: tuple[int, list[dict[str, np.ndarray]], tuple[int, ...] | None] | None = None,
        schedule_state: dict | None = None,  # a checkpoint's, for a schedule that keeps one
    ) -> Session:
        try:
            hps = config.hyperparameters_for(list(layout.names))
            states = config.initial_states(layout.names, params, hps)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        step, tensor_steps = 0, None
        if restored is not None:
            step, buffers, tensor_steps = restored
            counts = tensor_steps or (step,) * len(states)
            states = [_restore_state(config.algorithm, s, b, n, t)
                      for s, b, n, t in zip(states, buffers, layout.names, counts)]
        try:
            config.check_schedule(step)
        except ScheduleOverflow as e:
            raise InvalidRequest(f"{e}, its first step; no session was created: choose a schedule that "
                                 "stays finite (a smaller gamma, say)") from None
        if len(layout.names) > self.settings.max_tensors_per_session:
            raise InvalidRequest(f"params has {len(layout.names)} tensors; this service allows at most "
                                 f"{self.settings.max_tensors_per_session} per session")
        if sum(layout.sizes) > self.settings.max_elements_per_session:
            raise InvalidRequest(f"params has {sum(layout.sizes)} elements; this service allows at most "
                                 f"{self.settings.max_elements_per_session} per session")
        session = Session(new_session_id(), owner, config, layout, step, params, states, tensor_steps=tensor_steps)
        self._check_fits(session, config)
        if config.schedule is not None and config.schedule.type == "reduce_on_plateau":
            session.schedule_state = _plateau_state(session, schedule_state)
        record = session.to_record()
        keep = self._snapshots_kept(config)
        caps = dataclasses.replace(self.caps, reserve=history.reserve(self.settings.history_steps, len(layout.names))
                                   + keep * len(record.data))
        try:
            await self.store.create(record, caps)
        except CapReached as e:
            raise _refusal(e) from None
        if keep:  # the first snapshot: the state it starts from
            session.version += 1
            record = session.to_record()
            await self.store.compare_and_set(record, 0, snapshot=(session.step, keep))
        self._warm.remember(from_record(record, private=False))
        return session

    async def load(self, owner: str | None, session_id: str) -> Session:
        return from_record(await self._record(owner, session_id))

    async def meta(self, owner: str | None, session_id: str) -> tuple[SessionRecord, dict]:
        record = await self._record(owner, session_id)
        return record, read_meta(record)

    async def _record(self, owner: str | None, session_id: str) -> SessionRecord:
        # the store checks the owner before it reads any tensor: another key's id costs what a
        # missing one does, whatever that session's size
        record = await self.store.get(session_id, owner)
        while session_id in self._writing:  # an update in place is writing the stored memory: its result
            waiter = self._writing[session_id]
            if waiter is None:
                waiter = self._writing[session_id] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
            record = await self.store.get(session_id, owner)
        if record is None:
            warm = self._warm.get(session_id)
            if warm is not None and warm.owner == owner:
                self._warm.forget(session_id)  # expired or deleted elsewhere: free its decoded copy now
            raise SessionNotFound(f"no session '{session_id}' (it may have been deleted or never existed)")
        return record

    async def prune_warm(self) -> None:
        """Let go of the warm copies of sessions the store no longer has (expired, or deleted by
        another process): with a private store nothing else bounds them."""
        for session_id in self._warm.ids():
            if await self.store.version(session_id) is None:
                self._warm.forget(session_id)

    async def history(self, owner: str | None, session_id: str) -> list[dict]:
        """Every kept history entry of a session, oldest first."""
        record = await self._record(owner, session_id)  # its owner's, or 404
        return history.parse(await self.store.get_history(session_id), self._warm.template(record).layout.names)

    async def history_after(self, owner: str | None, session_id: str, step: int) -> list[dict]:
        """The history entries past ``step``, oldest first, parsing only those (a follower's poll)."""
        names = self._warm.template(await self._record(owner, session_id)).layout.names
        newer = []
        for raw in reversed(await self.store.get_history(session_id)):
            entry = history.decode(raw, names)
            if entry["step"] <= step:
                break
            newer.append(entry)
        return newer[::-1]

    def next_lrs(self, record: SessionRecord) -> list[float] | None:
        """The learning rate each param group takes on the session's next step (None past overflow)."""
        try:
            return _lrs(self._warm.template(record))
        except ScheduleOverflow:
            return None

    async def list(self, owner: str | None, limit: int, after: str | None) -> list[tuple[SessionRecord, dict]]:
        return [(r, read_meta(r)) for r in await self.store.list(owner, limit, after)]

    async def delete(self, owner: str | None, session_id: str) -> None:
        await self._record(owner, session_id)
        self._warm.forget(session_id)
        if not await self.store.delete(session_id):
            raise SessionNotFound(f"no session '{session_id}'")

    async def step(
        self,
        owner: str | None,
        session_id: str,
        decode: GradientDecoder,
        *,
        loss: float | None = None,
        if_match: int | None = None,
        idempotency: tuple[str, str] | None = None,  # (key, body digest)
        memory: np.ndarray | None = None,  # from binary_memory, holding the body that ``decode`` reads
        contribution: Contribution = Contribution(),
        dry_run: bool = False,
        settle_later: bool = False,
        volatile: Callable[[], Awaitable[None]] | None = None,
        answer_into: memoryview | None = None,
    ) -> StepResult:
        """One step, after the steps on this session ahead of it in this process; the lock is
        dropped with the last step that needs it, so idle sessions hold none. With ``settle_later``
        a committed step's bookkeeping is left to the caller, to run once its answer is sent
        (``StepResult.settle``): none of it is the answer's, and a small step's client waited for it.
        ``volatile``: ``decode``'s gradients lie in memory a client can still write (a mapped region),
        and awaiting it copies them into the server's. A step that may go in place reads them where they
        lie, guarded in place (``kernels.guarded``), out of place refused if non-finite; every other path
        (a dry run, a round, a store of its own) takes the copy first, as it reads them more than once.
        An update in place also writes the new parameters into ``answer_into`` (a client's mapped region
        of the layout's size) in its own pass, and says so (``StepResult.answered``)."""
        if dry_run:  # the would-be step, written nowhere: no lock, claim, history or round
            if volatile is not None:
                await volatile()
            return await self._dry_run(owner, session_id, decode, loss, if_match, memory)
        turn = self._turns.take(session_id)  # the session's turn, after the steps ahead of it
        if turn is not None:
            await self._turns.wait(session_id, turn)
        try:  # (the attempts here, not in a call: a coroutine less each way)
            for attempt in range(self.settings.cas_retries):
                record = await self.store.get(session_id, owner)  # _record's work when it has none to do
                if record is None or session_id in self._writing:
                    record = await self._record(owner, session_id)
                if idempotency is not None:
                    replay = await self._replay(record, *idempotency)
                    if replay is not None:
                        return replay
                if attempt and memory is not None:  # the first attempt wrote over the gradients
                    raise StepConflict("the session changed under this step; retry it")
                template = self._warm.template(record)
                if if_match is not None and template.step != if_match:
                    raise VersionMismatch(
                        f"If-Match expected step {if_match}, the session is at step {template.step}",
                        step=template.step,
                    )
                schedule = template.config.schedule
                if schedule is not None and schedule.type == "lr_range_test" and loss is not None:
                    await self._range_test_goes_on(template, loss)
                aggregation = template.config.aggregation
                provable = self._provable(template)  # (never for a round: it checks a contribution, then adds it)
                in_place = provable and template.id not in self._dry_runs and template.alone(record)
                if volatile is not None and not in_place:
                    await volatile()
                    volatile = None
                if aggregation.mode == "sync":
                    result = await self._contribute(record, template, decode, loss, idempotency, contribution)
                    if result is not None:
                        return result
                    continue  # another process took the round on: reload
                lr_scale = tau = None
                if aggregation.mode == "async":
                    tau, lr_scale = _staleness(template.step, contribution.base_step, aggregation)
                args = (record, template, decode, memory, loss, lr_scale, tau, contribution.worker, idempotency)
                if in_place:
                    result = await self._in_place(*args, guarded=volatile is not None, answer=answer_into)
                else:  # a proof still carries the maxima to the next step, which may then go in place
                    result = await self._apply(*args, bound=provable, settle_later=settle_later)
                if result is not None:
                    return result
            raise StepConflict(
                f"the session kept changing under this step ({self.settings.cas_retries} attempts); retry"
            )
        finally:
            self._turns.leave(session_id)

    async def _dry_run(self, owner, session_id, decode, loss, if_match, memory) -> StepResult:
        template = self._warm.template(await self._record(owner, session_id))
        if if_match is not None and template.step != if_match:
            raise VersionMismatch(f"If-Match expected step {if_match}, the session is at step {template.step}",
                                  step=template.step)
        self._dry_runs[session_id] = self._dry_runs.get(session_id, 0) + 1
        try:
            session, grad_norm, compute_ms, skipped, _ = await self._compute(template, decode, memory, loss)
        finally:
            if self._dry_runs[session_id] == 1:
                del self._dry_runs[session_id]
            else:
                self._dry_runs[session_id] -= 1
        return StepResult(session, grad_norm, compute_ms, skipped=skipped, dry_run=True)

    async def rollback(self, owner: str | None, session_id: str, to_step: int,
                       idempotency: tuple[str, str] | None = None) -> tuple[dict, bool]:
        """Restore the state the session had after step ``to_step``, bit-exactly, from its kept
        snapshots (the later ones are dropped); the new metadata and whether this was a replay."""
        async with self._locked(session_id):
            for _ in range(self.settings.cas_retries):
                record = await self._record(owner, session_id)
                if idempotency is not None:
                    claim = await self._claimed(session_id, *idempotency, what="rollback")
                    if claim is not None:
                        if claim.version != record.version:
                            raise StepConflict(f"Idempotency-Key '{idempotency[0]}' rolled back to step {claim.step}; "
                                               "the session has moved since", step=claim.step)
                        return read_meta(record), True
                template = self._warm.template(record)
                keep = self._snapshots_kept(template.config)
                snapshot = await self.store.get_snapshot(session_id, to_step) if keep else None
                if snapshot is None:
                    kept = await self.store.snapshot_steps(session_id) if keep else []
                    raise StepConflict(
                        f"step {to_step} is outside the kept window of snapshots: this session keeps "
                        + (f"steps {kept[0]} to {kept[-1]} ({keep} at most)" if kept else "none")
                        + ("" if keep else " (create it with \"rollback_snapshots\": N, or set OPTIM_ROLLBACK_SNAPSHOTS)"),
                        step=template.step)
                restored = SessionRecord(session_id, record.owner, record.version + 1, snapshot.meta, snapshot.data)
                claim = self._claim(idempotency, restored.version, to_step)
                if await self.store.compare_and_set(restored, record.version, claim, None, None, (to_step, keep)):
                    self._warm.forget(session_id)
                    self._committed(session_id)
                    return read_meta(restored), False
        raise StepConflict("the session kept changing under this rollback; retry")

    async def fork(self, owner: str | None, session_id: str, optimizer: dict | None = None,
                   idempotency: tuple[str, str] | None = None) -> tuple[Session, bool]:
        """A new session at the same step with bit-identical state, its optimizer's hyperparameters
        overridden by ``optimizer`` (three learning rates from one point, say); and whether it was
        a retry's. Under an Idempotency-Key the fork's id derives from the source and the key, so a
        retry finds the fork it made instead of making another; the key with another body is a 422."""
        template = self._warm.template(await self._record(owner, session_id))
        fork_id = None
        if idempotency is not None:
            digest = blake3.blake3(f"fork\0{owner}\0{session_id}\0{idempotency[0]}".encode())
            fork_id = "f" + base64.urlsafe_b64encode(digest.digest(16)).decode().rstrip("=")[:21]
            existing = await self.store.get(fork_id, owner)
            if existing is not None:
                return _fork_of(existing, idempotency), True
            # a step may have run meanwhile (in place, it wrote the memory that template views)
            template = self._warm.template(await self._record(owner, session_id))
        config = template.config
        if optimizer:
            if optimizer.get("type", config.optimizer.type) != config.optimizer.type:
                raise InvalidRequest("a fork keeps its optimizer's type; create a session from GET .../state instead")
            try:
                config = TrainingConfig.model_validate({**config.model_dump(mode="json"),
                                                        "optimizer": {**config.optimizer.model_dump(mode="json"),
                                                                      **optimizer}})
            except ValidationError as e:
                raise InvalidRequest("optimizer: " + "; ".join(
                    f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
            kept = {k for k, v in template.states[0]._asdict().items() if v is not None} if template.states else set()
            probe = np.zeros(template.layout.shapes[0], template.layout.np_dtype)  # calloc: no memory touched
            wants = {k for k, v in config.algorithm.init(probe, config.optimizer)._asdict().items() if v is not None}
            if template.states and kept != wants:
                raise InvalidRequest(f"a fork keeps the optimizer's state: these settings need buffers {sorted(wants)}, "
                                     f"the session holds {sorted(kept)} (momentum 0 and above, amsgrad and centered "
                                     "change which it keeps)")
        clone = template.fork()  # a private copy of the bytes: bit-identical state
        for cached in ("config_json", "hyperparameters"):
            clone.__dict__.pop(cached, None)
        now = time.time()
        clone.id, clone.config, clone.version, clone.created_at, clone.updated_at = (
            fork_id or new_session_id(), config, 0, now, now)
        clone.forked_from = {"session": session_id, "step": template.step}
        clone.fork_request = idempotency[1] if idempotency is not None else None
        record = clone.to_record()
        caps = dataclasses.replace(self.caps, reserve=history.reserve(self.settings.history_steps,
                                                                      len(clone.layout.names)))
        try:
            await self.store.create(record, caps)
        except CapReached as e:
            raise _refusal(e) from None
        except SessionExists:  # a retry running beside the first: that one made it
            existing = await self.store.get(clone.id, owner)
            if existing is None:
                raise StepConflict("the fork this Idempotency-Key made is gone; retry with a new key") from None
            return _fork_of(existing, idempotency), True
        return clone, False

    def _locked(self, session_id: str) -> _Turn:
        """This process's turn on a session, after the steps ahead of it (``async with``)."""
        return _Turn(self._turns, session_id)

    async def _apply(self, record, template, decode, memory, loss, lr_scale, tau, worker, idempotency,
                     in_place: bool = False, bound: bool = False, settle_later: bool = False,
                     guarded: bool = False, answer: memoryview | None = None) -> StepResult | None:
        """Compute the step and commit it; None when the session changed meanwhile (retry)."""
        later = settle_later and self.store.private  # the history line too: measured once it is read
        session, grad_norm, compute_ms, skipped, line = await self._compute(
            template, decode, memory, loss, lr_scale or 1.0, worker, in_place, bound or in_place, later, guarded, answer)
        claim = self._claim(idempotency, session.version, session.step)
        written = session.buffer is template.buffer
        if await self.store.compare_and_set(*self._writes(session, record.version, claim, history=line)):
            settle = None
            if settle_later:
                settle = partial(self._settle, session, line[0] if later and line is not None else None)
            else:
                self._stored(session)
            return StepResult(session, grad_norm, compute_ms, skipped=skipped, lr_scale=lr_scale, staleness=tau,
                              in_place=written, answered=written and answer is not None, settle=settle)
        if written:  # written in place, not stored (the session was deleted meanwhile): drop the copy
            self._warm.forget(template.id)
            logger.warning("an update in place of %s found its session gone", template.id)
        return None

    def _provable(self, template: Session) -> bool:
        """Whether this step may update the stored state itself, if nothing else reads it
        (``Session.alone``) and its bound then holds (decided where the update runs): the memory
        store (whose record is this memory, and whose compare-and-set cannot fail under the
        session's lock), a state large enough to gain by it, no snapshot keeping it, no round."""
        config = template.config
        return (self.settings.in_place and self.settings.fused_kernels and self.store.private
                and len(template.buffer) >= self.settings.in_place_min_bytes
                and config.algorithm.bound is not None and not self._snapshots_kept(config)
                and config.aggregation.mode != "sync" and template.tensor_steps is None)

    async def _in_place(self, record, template, *args, guarded: bool = False,
                        answer: memoryview | None = None) -> StepResult | None:
        """``_apply`` that may write the stored state: readers wait until it has committed, and it runs
        to its commit even if the request is cancelled (the memory is the store's record)."""
        session_id = template.id
        self._writing[session_id] = None

        async def run():
            try:
                return await self._apply(record, template, *args, in_place=True, guarded=guarded, answer=answer)
            finally:
                waiter = self._writing.pop(session_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        return await asyncio.shield(asyncio.ensure_future(run()))

    async def _range_test_goes_on(self, template: Session, loss: float) -> None:
        """A range test stops where the loss diverged (its smoothed value over 4× its best, fastai's
        rule): the step that would go past it is refused, and the diagnosis suggests an lr."""
        losses = [h["loss"] for h in history.parse(await self.store.get_history(template.id), template.layout.names)
                  if h.get("loss") is not None] + [loss]
        curve = smoothed(losses)
        best = min(curve)
        if not math.isfinite(curve[-1]) or (best > 0 and curve[-1] > self.settings.diagnosis_divergence_factor * best):
            raise InvalidRequest(
                f"the lr range test stopped: the loss diverged at step {template.step + 1} (smoothed {curve[-1]:.3g}, "
                f"over {self.settings.diagnosis_divergence_factor:g}× its best {best:.3g}); nothing was changed. "
                "GET .../diagnosis suggests a learning rate")

    async def _compute(self, template: Session, decode, memory, loss, lr_scale: float = 1.0, worker=None,
                       in_place: bool = False, bound: bool = False, line_later: bool = False, guarded: bool = False,
                       answer: memoryview | None = None):
        """The step ``template`` takes on ``decode``'s gradients: a new session (version bumped),
        the gradient norm, the update's time, whether ``nan_policy: "skip"`` skipped it, and its
        history line (None with history off; with ``line_later`` a ``history.Pending``, for a private
        store, measured once read). With ``bound`` the update is proven finite where it
        can be, and with ``in_place`` it then writes ``template``'s own memory (``_timed_advance``);
        ``guarded``: the gradients lie in a client's live memory, read once, after the norm's pass;
        ``answer``: where an update in place writes the new parameters as well."""
        grads = decode(template)  # (a decoder reads the layout only: the working copy's is the same)
        if bound and any(g is None for g in grads):  # some tensors skip this step: unproven
            in_place = bound = False
        keep = self.settings.history_steps
        clipping = template.config.clip_grad_norm is not None  # the update's own norm is the line's then
        # the line's pass takes the norm of one run of gradients after the update, unless the update
        # overwrites it (a body read into the working copy) or it is in pieces: then now, apart
        whole = history.one_run(grads) if keep and memory is None and not clipping and not guarded else None
        early = keep and whole is None and (memory is not None or not clipping)  # the norm, before the update
        args = (early, template, memory, grads, self.settings.fused_kernels, lr_scale, bound, in_place,
                template.layout.sizes if keep else None, guarded, answer)
        try:
            if sum(template.layout.sizes) < self.settings.thread_offload_elements:
                norm, (session, grad_norm, compute_ms, old) = _measured_advance(*args)
            else:  # off the event loop, so that it keeps serving small steps meanwhile
                norm, (session, grad_norm, compute_ms, old) = await on_kernel_thread(_measured_advance, *args)
        except ScheduleOverflow as e:
            raise InvalidRequest(
                f"{e}; nothing was changed. This session cannot step past step {template.step}: resume its "
                "GET .../state as a new session with a schedule that stays finite", step=template.step) from None
        if memory is not None and session.buffer is not memory:  # the body's memory was not the working copy
            recycle(memory)
        skipped = grad_norm is SKIPPED
        if keep and norm is None:
            if clipping and not skipped:
                norm = grad_norm
            elif skipped:  # no line pass: the gradients (not the update's memory here) are intact
                norm = history.grad_norm(grads)
        if skipped:  # store only the count: the arrays may be half-updated
            session = template.fork()
            session.skipped_steps += 1
            session.updated_at = time.time()
            grad_norm = None
        elif loss is not None:
            session.loss = loss
            if session.schedule_state is not None:  # a scheduler stepped with the loss, after the step
                session.schedule_state = template.config.schedule.after(session.schedule_state, loss)
        session.version += 1
        line = None
        if keep:
            def measure() -> bytes:
                clip = template.config.clip_grad_norm
                return history.entry(
                    template.step + 1, template.all_params() if old is None else old, session.all_params(),
                    template.layout.sizes, loss=loss, lrs=_lrs(template, lr_scale), norm=norm, worker=worker,
                    skipped=skipped, clip=clip.max_norm if clip else None, grads=None if skipped else whole,
                    sampled=old is not None)
            line = (history.Pending(measure) if line_later else measure(), keep)
        return session, grad_norm, compute_ms, skipped, line

    def _check_fits(self, session: Session, config: TrainingConfig) -> None:
        """A session whose state, or whose synchronous round's sum, is more than the store keeps in one
        session: a 422 that says so, before anything is written."""
        state = sum(a.nbytes for a in (*session.params, *(b for s in session.states for b in s if b is not None)))
        limit = self.store.max_record_bytes
        if limit is not None and state > limit:
            raise InvalidRequest(f"this session's state is {state} bytes (parameters and optimizer buffers); this "
                                 f"store keeps at most {limit} per session (SQLite's limit on one value): use Redis "
                                 "or the memory store, or fewer parameters")
        limit = self.store.max_round_bytes
        if config.aggregation.mode == "sync" and limit is not None and session.layout.nbytes > limit:
            raise InvalidRequest(f"a synchronous round keeps the sum of its gradients, {session.layout.nbytes} bytes "
                                 f"for this session, as one value, and this store keeps at most {limit}: use "
                                 'fewer parameters per session, float32, or "aggregation": "async"')

    def _snapshots_kept(self, config: TrainingConfig) -> int:
        return config.rollback_snapshots if config.rollback_snapshots is not None else self.settings.rollback_snapshots

    def _writes(self, session: Session, expected_version: int, claim: Claim | None, close_round: int | None = None,
                history: tuple[bytes, int] | None = None) -> tuple:
        """The store's ``compare_and_set`` arguments that commit ``session`` (and its snapshot, when
        kept); ``_stored`` then once it is. (Two plain calls around the store's: a coroutine of our
        own around it cost a small step µs.)"""
        keep = self._snapshots_kept(session.config)
        return (session.to_record(), expected_version, claim, close_round, history,
                (session.step, keep) if keep else None)

    def _stored(self, session: Session) -> None:
        session.freeze()
        self._warm.remember(session)  # its buffer is the stored record's data now
        self._committed(session.id)

    def _settle(self, session: Session, line: history.Pending | None = None) -> None:
        """``_stored``, after the answer, with the step's history ``line`` measured first (while the
        memory it reads is certainly as the step left it): unless a later step of the session got
        there first (its answer's send waited for a slow reader meanwhile), which then stays the warm one."""
        if line is not None:
            bytes(line)
        warm = self._warm.get(session.id)
        if warm is not None and warm.version > session.version:
            session.freeze()
            self._committed(session.id)
            return
        self._stored(session)

    # -- synchronous rounds -----------------------------------------------------------------------

    async def _contribute(self, record, template: Session, decode, loss, idempotency, contribution) -> StepResult | None:
        """Add a contribution to the session's open round, and step on the round's mean when it is
        complete. None when another process changed the round or the session meanwhile."""
        config = template.config.aggregation
        number = template.step  # round r commits as step r + 1
        if not contribution.worker:
            raise InvalidRequest('this session steps in synchronous rounds: a contribution names its "worker" '
                                 "(or the header Optim-Worker), so that no worker counts twice in a round")
        if contribution.round is not None and contribution.round != number:
            raise StepConflict(f"round {contribution.round} is not open; round {number} is (the session is at step "
                               f"{number}): contribute to it with the params of step {number}", step=number)
        stored = await self.store.get_round(template.id)
        now = time.time()
        current = Round.current(stored, number, config, template.layout.np_dtype, now)
        if current.number != number:  # a round left behind by a step that did not close it: never written so
            raise StepConflict(f"the session's round {current.number} does not match its step {number}; retry")
        if contribution.worker in current.workers:
            raise StepConflict(f"worker '{contribution.worker}' has contributed to round {number} already; the round "
                               f"has {len(current.workers)} of {config.contributions}", step=number)
        grads = decode(template)
        if any(g is None for g in grads):
            raise InvalidRequest("a contribution to a round has a gradient for every tensor (null skips only a step)")
        flat = joined(grads)  # a binary body's run as it is
        require_finite(flat, "contribution", template.layout.dtype)  # one NaN would poison the whole round
        weight = contribution.weight if config.weighting == "weighted" else 1.0
        grown = current.add(contribution.worker, weight, flat, loss)
        if not grown.due(config, now):
            # a negative step: acknowledged into round r, not yet applied
            claim = self._claim(idempotency, record.version, -(number + 1))
            if not await self.store.put_round(template.id, grown.record(), current.version, claim):
                return None
            self._arm_deadline(template.owner, template.id, grown, config)
            return StepResult(template, None, 0.0, pending=grown.status(config))
        return await self._close(record, template, grown, idempotency)

    async def _close(self, record, template: Session, done: Round, idempotency) -> StepResult | None:
        """Step on ``done``'s mean and close it, in one compare-and-set."""
        mean = Run(done.mean(), template.layout.shapes)
        session, grad_norm, compute_ms, skipped, line = await self._compute(
            template, lambda s: mean, None, done.mean_loss())
        claim = self._claim(idempotency, session.version, session.step)
        if not await self.store.compare_and_set(*self._writes(session, record.version, claim, done.version, line)):
            return None
        self._stored(session)
        self.round_latency(time.time() - done.opened_at)
        return StepResult(session, grad_norm, compute_ms, skipped=skipped, round=done.number)

    round_latency = staticmethod(lambda seconds: None)  # the app sets a histogram's observe

    async def round_status(self, owner: str | None, session_id: str) -> RoundStatus:
        """The open round of a session in synchronous rounds, committed first if it is due."""
        await self.commit_due(owner, session_id)
        record = await self._record(owner, session_id)
        template = self._warm.template(record)
        config = template.config.aggregation
        if config.mode != "sync":
            raise StepConflict(f"this session aggregates as {config.mode!r}: it has no rounds")
        stored = await self.store.get_round(session_id)
        return Round.current(stored, template.step, config, template.layout.np_dtype).status(config)

    async def commit_due(self, owner: str | None, session_id: str) -> StepResult | None:
        """Commit the open round if its time is up and it has its minimum; None otherwise."""
        async with self._locked(session_id):
            for _ in range(self.settings.cas_retries):
                record = await self._record(owner, session_id)
                template = self._warm.template(record)
                config = template.config.aggregation
                if config.mode != "sync":
                    return None
                stored = await self.store.get_round(session_id)
                if stored is None:
                    return None
                current = Round.load(stored, template.layout.np_dtype)
                if current.number != template.step or not current.due(config, time.time()):
                    return None
                result = await self._close(record, template, current, None)
                if result is not None:
                    return result
        return None

    async def wait_round(self, owner: str | None, session_id: str, number: int, seconds: float) -> StepResult | None:
        """Wait up to ``seconds`` for round ``number`` to commit (here, in another process, or by its
        timeout); the session after it, or None if it is still open."""
        deadline = time.monotonic() + seconds
        while True:
            result = await self.commit_due(owner, session_id)
            if result is None:
                record = await self._record(owner, session_id)
                session = self._warm.template(record)
                if session.step > number:
                    return StepResult(session, None, 0.0, round=number)
            else:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = self._waiting.setdefault(session_id, asyncio.Event())
            try:  # woken by a commit in this process; polls for one in another
                await asyncio.wait_for(event.wait(), min(left, 0.05))
            except TimeoutError:
                pass

    def _committed(self, session_id: str) -> None:
        event = self._waiting.pop(session_id, None)
        if event is not None:
            event.set()

    def _arm_deadline(self, owner, session_id: str, current: Round, config) -> None:
        """Commit a round at its deadline from this process too, not only at the next request."""
        if current.deadline is None or session_id in self._timers:
            return
        delay = max(current.deadline - time.time(), 0.0) + 0.001

        def fire():
            self._timers.pop(session_id, None)
            task = asyncio.get_running_loop().create_task(self._commit_quietly(owner, session_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._timers[session_id] = asyncio.get_running_loop().call_later(delay, fire)

    async def _commit_quietly(self, owner, session_id: str) -> None:
        try:
            await self.commit_due(owner, session_id)
        except Exception:  # the next contribution, GET .../round or a waiting contributor retries it
            logger.warning("committing a timed-out round of %s failed", session_id, exc_info=True)

    def _claim(self, idempotency: tuple[str, str] | None, version: int, step: int) -> Claim | None:
        """The claim a write takes for its Idempotency-Key (key, body digest), if it has one."""
        if idempotency is None:
            return None
        return Claim(idempotency[0], idempotency[1], version, step, self.settings.idempotency_ttl_seconds)

    async def _claimed(self, session_id: str, key: str, digest: str, what: str = "step") -> Claim | None:
        """The live claim of ``key``, if this very request took it; 422 if another request did."""
        claim = await self.store.get_claim(session_id, key)
        if claim is not None and claim.body_digest != digest:
            raise IdempotencyKeyReused(
                f"Idempotency-Key '{key}' was already used for a different request on this session; "
                f"use a new key for a new {what}"
            )
        return claim

    async def _replay(self, record: SessionRecord, key: str, digest: str) -> StepResult | None:
        claim = await self._claimed(record.id, key, digest)
        if claim is None:
            return None
        session = from_record(record)
        if claim.step < 0:  # a contribution acknowledged into round r
            number = -claim.step - 1
            if session.step == number:
                template = self._warm.template(record)
                stored = await self.store.get_round(record.id)
                config = template.config.aggregation
                current = Round.current(stored, number, config, template.layout.np_dtype)
                return StepResult(template, None, 0.0, replayed=True, pending=current.status(config))
            if session.step == number + 1:  # its round committed, and nothing since
                return StepResult(session, None, 0.0, replayed=True, round=number)
            raise StepConflict(
                f"Idempotency-Key '{key}' was a contribution to round {number}, which committed as step {number + 1}; "
                f"the session has since moved to step {session.step}, so that answer is gone. GET the params instead.",
                step=number + 1)
        if claim.version != record.version:
            raise StepConflict(
                f"Idempotency-Key '{key}' was applied as step {claim.step}; the session has since "
                f"moved to step {session.step}, so that answer is gone. GET the params instead.",
                step=claim.step,
            )
        return StepResult(session, None, 0.0, replayed=True)


SKIPPED = object()  # what _advance returns when nan_policy "skip" refuses the step

# Large updates run on this one long-lived thread. numba's parallel kernels keep a thread team per
# calling thread (OpenMP here): updates landing on whichever pooled thread was free left idle teams
# spinning on the cores, and some 10M steps took 10-20x their time (bench/threads.py).
KERNEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optim-kernels")


def _plateau_state(session: Session, restored: dict | None) -> dict:
    """reduce_on_plateau's state: a checkpoint's, checked, or a fresh one at the groups' lrs."""
    fresh = session.config.schedule.start([hp.lr for hp in _groups(session.config_json, session.layout.names)])
    if restored is None:
        return fresh
    if (not isinstance(restored, dict) or set(restored) != set(fresh) or not isinstance(restored["lrs"], list)
            or len(restored["lrs"]) != len(fresh["lrs"])
            or not all(isinstance(x, (int, float)) and x >= 0 for x in restored["lrs"])):
        raise InvalidRequest(f"state.schedule_state: expected {sorted(fresh)} with one lr per param group "
                             f"({len(fresh['lrs'])}), as GET .../state writes it")
    return restored


def _lr_of(session: Session) -> dict[int, float] | None:
    """The lr a stateful schedule has set for each group, by the id of its hyperparameters."""
    state = session.schedule_state
    if state is None:
        return None
    return {id(hp): lr for hp, lr in zip(_groups(session.config_json, session.layout.names), state["lrs"])}


def _lrs(session: Session, lr_scale: float = 1.0) -> Sequence[float]:
    """The learning rate each param group takes on the session's next step: the optimizer's own
    group first, then the groups in the order their tensors come."""
    config, t = session.config, session.step
    if session.schedule_state is not None:
        return [lr * lr_scale for lr in session.schedule_state["lrs"]]
    if config.schedule is None:
        return _constant_lrs(session.config_json, session.layout.names, lr_scale)
    groups = _groups(session.config_json, session.layout.names)
    return [config.schedule.lr_at(hp.lr, t) * lr_scale for hp in groups]


@lru_cache(maxsize=4096)
def _constant_lrs(config_json: bytes, names: tuple[str, ...], lr_scale: float) -> tuple[float, ...]:
    """A schedule-less session's lrs: the same every step."""
    return tuple(hp.lr * lr_scale for hp in _groups(config_json, names))


@lru_cache(maxsize=4096)
def _groups(config_json: bytes, names: tuple[str, ...]) -> tuple:
    config, hps = parse_config(config_json), hyperparameters_of(config_json, names)
    return tuple({id(hp): hp for hp in (config.optimizer, *hps)}.values())


def _staleness(step: int, base_step: int | None, config) -> tuple[int, float]:
    """An asynchronous push's staleness τ and its learning-rate scale s(τ); 409 past the bound."""
    if base_step is None:
        return 0, 1.0
    if base_step > step:
        raise InvalidRequest(f"base_step {base_step} is ahead of the session, which is at step {step}")
    tau = step - base_step
    if tau > config.max_staleness:
        raise StepConflict(
            f"this gradient was computed on step {base_step}, {tau} steps behind the session (step {step}); this "
            f"session takes pushes at most {config.max_staleness} steps stale: fetch the params and compute it again",
            step=step)
    return tau, config.staleness_scale(tau)


def _timed_advance(template: Session, memory, grads, fused: bool, lr_scale: float, bound: bool, in_place: bool,
                   grad_max: float | None, sizes, guarded: bool = False,
                   answer: memoryview | None = None) -> tuple[Session, object, float, np.ndarray | None]:
    """The step ``template`` takes (``_advance``) and its time in ms, taken where it runs: Server-Timing's
    compute is the update (with the proof that it may go in place), not also its wait behind other
    sessions' updates on the kernel thread (that is latency). It writes a working copy (in
    ``memory`` if given), or, with ``in_place`` where ``template``'s bound holds (proven with
    ``bound``, given ``grad_max``, max|g|, when the history's pass took it), ``template``'s own memory;
    returns the session written, the result, the time and, in place, the history's sample of the
    old parameters (``sizes``: the history is on). A proven step carries its maxima either way. With
    ``guarded`` (gradients a client may still change) an update in place reads each gradient through
    ``kernels.guarded`` at the max|g| the proof took, so a changed one cannot break the proof; it
    writes the new parameters into ``answer`` (bytes in creation order) as well, if given."""
    started = time.perf_counter()
    if bound and grad_max is None:
        whole = history.one_run(grads)
        grad_max = max_abs(whole) if whole is not None else max(max_abs(g) for g in grads)
    top = _in_place_bound(template, lr_scale, grad_max) if bound else None
    old = None
    if top is None or not in_place:
        session = template.fork(copy=False, memory=memory)  # the update writes every element of it
        result = _advance(session, grads, fused, template, lr_scale)
        if top is not None and result is not SKIPPED:
            session.top = top
    else:
        if sizes is not None:
            old = history.sample(template.all_params(), sizes)
        session = template.fork_in_place()
        try:
            out = None if answer is None else np.frombuffer(answer, template.layout.np_dtype)
            result = _advance(session, grads, fused, None, lr_scale, (grad_max, 0.0) if guarded else UNGUARDED, out)
        except InvalidRequest:
            result = SKIPPED
        if result is SKIPPED:  # cannot be, unless a bound is wrong: the stored state is lost
            raise RuntimeError(f"an update in place of {template.id} came out non-finite: a bound is wrong")
        session.top = top
    return session, result, (time.perf_counter() - started) * 1e3, old


def _measured_advance(early: bool, template: Session, memory, grads, fused: bool, lr_scale: float, bound: bool,
                      in_place: bool, sizes, guarded: bool = False,
                      answer: memoryview | None = None) -> tuple[float | None, tuple]:
    """``_timed_advance``, after the line's gradient norm when ``early`` (with max|g| for a proof, in the
    same pass): where a step's update runs, its passes over the gradients run too."""
    norm = grad_max = None
    if early:
        norm, grad_max = history.grad_norm_and_max(grads) if bound else (history.grad_norm(grads), None)
    return norm, _timed_advance(template, memory, grads, fused, lr_scale, bound, in_place, grad_max, sizes, guarded,
                                answer)


async def on_kernel_thread(fn, *args):
    """``fn(*args)`` on the kernel thread, off the event loop and on that thread's team of cores. The
    arguments go in a box the call empties: the executor's work item, which its thread may hold a
    moment after the result is in, then holds no session's memory (a step in place checks that
    nothing else does: ``Session.alone``)."""
    box = [(fn, args)]
    await asyncio.get_running_loop().run_in_executor(KERNEL_THREAD, _call_boxed, box)
    return box.pop()


def _call_boxed(box: list) -> None:
    fn, args = box.pop()
    box.append(fn(*args))


# after a measured bound fails (a huge state), the steps that do not measure again before trying
UNPROVEN_BACKOFF = 16


def _in_place_bound(template: Session, lr_scale: float, grad_max: float) -> Top | None:
    """The state's maxima after this step if its update provably writes only finite values (then it
    may go in place), given max|g|: from the maxima the last update in place carried, else measured
    (one pass over the state, only where the bound could hold at all)."""
    config, hps, dtype = template.config, template.hyperparameters, template.layout.np_dtype
    step, lr_of = template.step + 1, _lr_of(template)
    if template.top is not None:
        top = bound_step(config, hps, template.top, grad_max, step, dtype, lr_scale, lr_of)
        if top is not None:
            return top
    if step < template.unproven_until:
        return None
    flat = template.flat()
    params, states = ([flat[0]], [flat[1]]) if flat is not None else (template.params, template.states)
    zero = Top(0.0, config.algorithm.state_type(*(None if b is None else 0.0 for b in states[0])))
    if bound_step(config, hps, zero, grad_max, step, dtype, lr_scale, lr_of) is None:
        return None  # unproven whatever the state (ε = 0, a flag, a huge gradient): nothing to measure
    top = bound_step(config, hps, measure(config.algorithm, params, states), grad_max, step, dtype, lr_scale, lr_of)
    if top is None:
        template.unproven_until = step + UNPROVEN_BACKOFF
    return top


def _advance(session: Session, grads: list[np.ndarray], fused: bool, template: Session | None,
             lr_scale: float = 1.0, guard: tuple[float, float] | None = None, out: np.ndarray | None = None):
    """Apply one step to ``session``, a fork of ``template`` that the update writes whole (or, with
    no ``template``, in place); a non-finite gradient or result is refused (``nan_policy: "error"``)
    or skipped, with the stored state unchanged (``"skip"``). Returns the gradient norm when clipping."""
    step = session.step + 1
    steps = None
    if session.tensor_steps is not None or any(g is None for g in grads):  # some tensors skip steps
        steps = [s + (g is not None) for s, g in zip(session.tensor_steps or [session.step] * len(grads), grads)]
    grad_norm, finite = apply_step(session.config, session.hyperparameters, session.params, grads,
                                   session.states, step, fused, session.flat(), template and template.source(), steps, lr_scale,
                                   _lr_of(session), guard, out)
    if not finite:
        if session.config.nan_policy == "skip":
            return SKIPPED
        dtype = session.layout.dtype
        read_over = any(grad is not None and np.may_share_memory(grad, session.buffer) for grad in grads)  # binary_memory
        if not read_over:
            for name, grad in zip(session.layout.names, grads):
                if grad is not None:
                    require_finite(grad, _gradient(name), dtype)
        found = next(((n, i) for n, p, s in zip(session.layout.names, session.params, session.states)
                      for a in (p, *s) if a is not None and (i := first_non_finite(a)) is not None), None)
        if found is None:  # the update's own scalar arithmetic overflowed (apply_step's ArithmeticError)
            raise InvalidRequest(
                f"step {step} of {session.config.optimizer.type} overflows with these hyperparameters (a factor "
                "that grows with the step count leaves float range); nothing was changed. Create the session "
                "with smaller hyperparameters.")
        name, index = found
        if read_over:  # the gradients' memory holds the new parameters now: which one it was is gone
            raise InvalidRequest(
                f"{_gradient(name)}: non-finite at index {list(index)}, in the gradient sent or in the "
                f"update it makes (NaN and ±Inf are refused; the update may also overflow {dtype}); "
                "nothing was changed. Check the gradients, scale them down or clip them (clip_grad_norm), "
                'or create the session with "nan_policy": "skip".'
            )
        label = f"tensor '{name}'" if name else "the parameters"
        raise InvalidRequest(
            f"this step would make {label} non-finite (overflow in {dtype}); "
            "nothing was changed. Scale the gradients down or clip them (clip_grad_norm), "
            'or create the session with "nan_policy": "skip".'
        )
    session.step = step
    session.tensor_steps = None if steps is None or all(t == step for t in steps) else tuple(steps)
    session.updated_at = time.time()
    return grad_norm


def _fork_of(record: SessionRecord, idempotency: tuple[str, str]) -> Session:
    """The fork an Idempotency-Key made, for a retry of the same request; 422 for another request."""
    fork = from_record(record)
    if fork.fork_request != idempotency[1]:
        raise IdempotencyKeyReused(f"Idempotency-Key '{idempotency[0]}' already made fork {fork.id} of this session "
                                   "with a different request; use a new key for a new fork")
    return fork


def _gradient(name: str) -> str:
    return f"gradient '{name}'" if name else "gradient"


def _restore_state(algorithm, template: tuple, buffers: dict[str, np.ndarray], name: str, updates: int) -> tuple:
    """A checkpoint's buffers for one tensor, checked as the optimizer needs them: the buffers it
    keeps, each finite (the decoder's check) and, where it is a sum or average of squares, >= 0. A
    tensor never updated may come without buffers, as torch keeps no state for it: it starts fresh."""
    label = f"tensor '{name}'" if name else "the tensor"
    if not buffers and updates == 0:
        return template
    expected = [k for k, v in template._asdict().items() if v is not None]
    if sorted(buffers) != sorted(expected):
        raise InvalidRequest(f"state for {label}: expected buffers {expected}, got {sorted(buffers)}")
    for buffer in algorithm.nonnegative_buffers:
        values = buffers.get(buffer)
        if values is not None and values.size and (low := float(values.min())) < 0:
            raise InvalidRequest(
                f"state for {label}: buffer '{buffer}' holds {low!r}, but {algorithm.name} keeps a sum or "
                "average of squares there, never negative; this checkpoint was not written by this "
                "optimizer, or was changed")
    return template._replace(**buffers)


def _refusal(e: CapReached):
    """A cap's refusal, saying what is left."""
    if e.cap == "sessions":
        return TooManySessions(f"the service holds its maximum of {e.limit} sessions; delete sessions you "
                               "no longer need (idle ones expire on their own)")
    if e.cap == "sessions_per_owner":
        return TooManySessions(f"this API key holds its maximum of {e.limit} sessions; delete sessions you "
                               "no longer need")
    left = max(e.limit - e.used, 0)
    whose = "this API key's sessions" if e.cap == "bytes_per_owner" else "the service's memory store"
    setting = "OPTIM_MAX_BYTES_PER_KEY" if e.cap == "bytes_per_owner" else "OPTIM_MEMORY_STORE_MAX_BYTES"
    return QuotaExceeded(
        f"this session needs {e.needed} bytes of storage; {whose} hold {e.used} of the {e.limit} allowed "
        f"({setting}), so {left} bytes are left; delete sessions you no longer need, or use fewer or "
        "smaller tensors", needed_bytes=e.needed, used_bytes=e.used, limit_bytes=e.limit)


def _half_the_memory() -> int:
    """The memory store's default budget: half this machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
