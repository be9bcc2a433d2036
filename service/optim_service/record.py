"""A session in memory, and how it becomes a store record (JSON meta + raw tensor bytes) and back.

The meta carries ``schema_version``, the full training config (optimizer name and every
hyperparameter) and the tensor layout, so the record alone rebuilds the session anywhere. The data
holds every parameter in creation order, then each kind of buffer in turn (every tensor's
``exp_avg``, then every tensor's ``exp_avg_sq``, ...). The parameters are one contiguous run, so a
binary answer is a slice of the session's memory, not a copy; and when every tensor holds the same
buffers, each kind is one run too, so a step can update the whole session in one call (every
optimizer here is element-wise). A loaded session's arrays are views into one private buffer, which
becomes the next record as it is, again no copy. That buffer is a numpy array: numpy asks for
transparent huge pages for large ones, which cut the page faults of a fresh 120 MB state from ~30,000
to ~60 (a 10M-parameter Adam step: 115 ms with a bytearray, 35 with this, on this project's VM).
Version 1 records, which kept each tensor's buffers together, are read, and written back as
version 2 by their next step.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import orjson

from .optim import OPTIMIZERS
from .optim.base import Top, adopt
from .optim.config import TrainingConfig
from .store import SessionRecord

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
Structure = Literal["array", "object"]


@dataclass(frozen=True)
class Layout:
    """The tensors a session holds: names in creation order, shapes, dtype, and how the client nests them."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    structure: Structure

    @cached_property  # (a step reads these several times)
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    @cached_property
    def nbytes(self) -> int:
        return sum(self.sizes) * self.np_dtype.itemsize

    def shapes_json(self):
        shapes = [list(s) for s in self.shapes]
        return shapes[0] if self.structure == "array" else dict(zip(self.names, shapes))


@lru_cache(maxsize=4096)
def parse_config(config_json: bytes) -> TrainingConfig:
    """Validated once per distinct config, not on every step of every session that uses it."""
    return TrainingConfig.model_validate_json(config_json)


@lru_cache(maxsize=4096)
def _hyperparameters(config_json: bytes, names: tuple[str, ...]) -> list:
    return parse_config(config_json).hyperparameters_for(list(names))


Where = tuple[int, int, tuple[int, ...]]  # (offset, size, shape), in elements


@dataclass(frozen=True)
class Slots:
    """Where each array lives in a record's data. Computed once per layout; ``param_views`` and
    ``state_views`` lay the arrays over any buffer, ``flat`` the whole session as one array per kind
    when it can."""

    dtype: np.dtype
    state_type: type  # the optimizer's NamedTuple
    schema: int
    buffer_names: tuple[tuple[str, ...], ...]  # per tensor, in state field order
    params: tuple[Where, ...]
    states: tuple[tuple[Where | None, ...], ...]  # per tensor, per state field
    kinds: tuple[int | None, ...] | None  # per state field, where its run over all tensors starts
    end: int  # the data's length in bytes
    tensors: orjson.Fragment = field(compare=False)  # the meta's tensor list, written once per layout

    def param_views(self, buf) -> list[np.ndarray]:
        flat = np.frombuffer(buf, self.dtype)
        return [flat[run] if shape is None else flat[run].reshape(shape) for run, shape in self._param_cuts]

    def state_views(self, buf) -> list[tuple]:
        flat, make, kind = np.frombuffer(buf, self.dtype), tuple.__new__, self.state_type
        return [make(kind, [None if cut is None else flat[cut[0]] if cut[1] is None else flat[cut[0]].reshape(cut[1])
                            for cut in cuts]) for cuts in self._state_cuts]

    # each array's (slice, shape) in the flat buffer, the shape None for a 1-D one: ``piece``'s work, done
    # once per layout (a call per array, and the NamedTuple's own __new__, showed in a small step)
    @cached_property
    def _param_cuts(self) -> tuple:
        return tuple(_cut(where) for where in self.params)

    @cached_property
    def _state_cuts(self) -> tuple:
        return tuple(tuple(None if where is None else _cut(where) for where in fields) for fields in self.states)

    def flat(self, buf) -> tuple[np.ndarray, tuple] | None:
        """Every parameter as one array and each buffer kind as one array, viewing ``buf`` (None for
        a single tensor, or tensors holding different buffers)."""
        if self.kinds is None:
            return None
        flat = np.frombuffer(buf, self.dtype)
        size = self.params[-1][0] + self.params[-1][1]  # every parameter, in one run from 0
        return flat[:size], self.state_type(*[None if k is None else flat[k:k + size] for k in self.kinds])


def _cut(where: Where) -> tuple[slice, tuple[int, ...] | None]:
    offset, size, shape = where
    return slice(offset, offset + size), None if len(shape) == 1 else shape


class Arrays:
    """A session's per-tensor arrays over its buffer, laid on first use: a step that updates the
    whole session as one array per kind (``Session.flat``) never needs them, and a 100-tensor Adam
    session has 300 (making them on every fork was 40% of such a step's server time)."""

    __slots__ = ("_slots", "_buffer", "_params", "_states")

    def __init__(self, slots: Slots, buffer: np.ndarray):
        self._slots, self._buffer = slots, buffer
        self._params: list[np.ndarray] | None = None
        self._states: list[tuple] | None = None

    def lists(self) -> tuple[Sequence[np.ndarray], Sequence[tuple]]:
        """The session's ``params`` and ``states``: sequences that lay their arrays when first read;
        or, for a session without a flat form (one tensor, or unlike ones), which a step updates
        tensor by tensor and so lays anyway, the lists laid now."""
        if self._slots.kinds is None:
            return self.params(), self.states()
        count = len(self._slots.params)
        return Tensors(self.params, count), Tensors(self.states, count)

    def params(self) -> list[np.ndarray]:
        if self._params is None:
            self._params = self._slots.param_views(self._buffer)
        return self._params

    def states(self) -> list[tuple]:
        if self._states is None:
            self._states = self._slots.state_views(self._buffer)
        return self._states

    def laid(self) -> list[np.ndarray]:
        """Every array laid so far."""
        return [*(self._params or ()), *(a for state in self._states or () for a in state if a is not None)]


class Tensors(Sequence):
    """One item per tensor (its parameter, or its optimizer state), from a function that lays them
    all when the first is read; the length needs none of them."""

    __slots__ = ("_lay", "_len", "_items")

    def __init__(self, lay: Callable[[], list], length: int):
        self._lay, self._len, self._items = lay, length, None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        return self._laid()[index]

    def __iter__(self):
        return iter(self._laid())

    def _laid(self) -> list:
        if self._items is None:
            self._items = self._lay()
        return self._items


@lru_cache(maxsize=4096)
def _slots(layout: Layout, optimizer: str, buffer_names: tuple[tuple[str, ...], ...],
           schema: int = SCHEMA_VERSION) -> Slots:
    algorithm = OPTIMIZERS[optimizer]
    fields = algorithm.state_type._fields
    for names in buffer_names:
        if set(names) - set(fields):
            raise ValueError(f"buffers {sorted(names)} are not all {algorithm.state_type.__name__} fields")
    offset, params = 0, []
    for size, shape in zip(layout.sizes, layout.shapes):
        params.append((offset, size, shape))
        offset += size
    tensors = range(len(layout.shapes))
    if schema == 1:  # one tensor's buffers after another's, as the meta lists them
        order = [(f, i) for i in tensors for f in buffer_names[i]]
    else:  # one kind after another, over every tensor that holds it
        order = [(f, i) for f in fields for i in tensors if f in buffer_names[i]]
    where: list[dict[str, Where]] = [{} for _ in tensors]
    for f, i in order:
        shape = algorithm.buffer_shape(f, layout.shapes[i])  # the parameter's, a scalar's, a row's...
        where[i][f] = (offset, math.prod(shape), shape)
        offset += math.prod(shape)
    kinds = None
    if (schema != 1 and algorithm.param_shaped and len(set(buffer_names)) <= 1
            and len(layout.shapes) > 1):  # one tensor is its own flat form
        first = where[0]
        kinds = tuple(first[f][0] if f in first else None for f in fields)
    states = tuple(tuple(w.get(f) for f in fields) for w in where)
    return Slots(layout.np_dtype, algorithm.state_type, schema, buffer_names, tuple(params), states, kinds,
                 offset * layout.np_dtype.itemsize, _tensors_json(layout, buffer_names))


class BufferPool:
    """Large session buffers a step has finished with, to be the working copy of a later step of the
    same size: memory already faulted in. A fresh 120 MB buffer costs page faults on first touch,
    and with transparent huge pages (which numpy asks for) sometimes a compaction stall: a 10M Adam
    step took 15 ms, or 60-90 ms (bench/threads.py). A buffer is handed out only when nothing but
    the pool refers to it (a stored record, a reader's view, a snapshot each hold a reference).
    Thread-safe: a step on the kernel thread takes its working copy there."""

    MIN_BYTES = 1 << 20  # below this, malloc is as fast and the pool would only hold memory

    def __init__(self, max_bytes: int = 1 << 30, per_size: int = 8, idle_seconds: float = 1.0):
        self.max_bytes, self.per_size, self.idle_seconds = max_bytes, per_size, idle_seconds
        self._buffers: list[np.ndarray] = []
        self._given: dict[int, float] = {}  # id(buffer) -> when it came
        self._lock = threading.Lock()

    def give(self, buffer: np.ndarray | None) -> bool:
        """Keep ``buffer`` for reuse; whether it was kept (so a trim is due)."""
        if buffer is None or buffer.nbytes < self.MIN_BYTES or not buffer.flags.owndata:
            return False
        with self._lock:
            return self._give(buffer)

    def _give(self, buffer: np.ndarray) -> bool:
        if any(b is buffer for b in self._buffers):
            return False
        same = [b for b in self._buffers if b.nbytes == buffer.nbytes]
        if len(same) >= self.per_size:
            self._drop(same[0])
        self._buffers.append(buffer)
        self._given[id(buffer)] = time.monotonic()
        while sum(b.nbytes for b in self._buffers) > self.max_bytes:
            self._drop(self._buffers[0])
        return True

    def trim(self) -> None:
        """Let go of buffers no step took within ``idle_seconds``: a session at rest holds its state
        and nothing more."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)

    def _trim(self, now: float) -> None:
        for buffer in [b for b in self._buffers if now - self._given.get(id(b), now) >= self.idle_seconds]:
            self._drop(buffer)

    def _drop(self, buffer: np.ndarray) -> None:
        self._buffers = [b for b in self._buffers if b is not buffer]
        self._given.pop(id(buffer), None)

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 buffer of ``nbytes``: a pooled one nobody else holds, else a new one."""
        if nbytes >= self.MIN_BYTES:
            with self._lock:
                return self._take(nbytes)
        return np.empty(nbytes, np.uint8)

    def _take(self, nbytes: int) -> np.ndarray:
        for i in range(len(self._buffers)):
            buffer = self._buffers[i]
            # the pool's list, this name and getrefcount's argument: nobody else's
            if buffer.nbytes == nbytes and sys.getrefcount(buffer) <= 3:
                del self._buffers[i]
                self._given.pop(id(buffer), None)
                buffer.flags.writeable = True  # it owns its memory: the frozen state it was is gone
                return buffer
        return np.empty(nbytes, np.uint8)


POOL = BufferPool()


@dataclass
class Session:
    id: str
    owner: str | None
    config: TrainingConfig
    layout: Layout
    step: int  # optimizer steps applied: the ETag
    params: Sequence[np.ndarray]  # a list, or over ``buffer``, laid on first use (``Arrays``)
    states: Sequence[tuple]  # one optimizer NamedTuple per tensor, buffers may be None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    loss: float | None = None  # the last loss a client reported with a step
    skipped_steps: int = 0  # steps refused by nan_policy "skip"
    # each tensor's count of updates, where a step skipped some (a gradient of null); None while
    # every tensor has taken every step
    tensor_steps: tuple[int, ...] | None = None
    # a schedule that reads the loss (reduce_on_plateau): its state, replaced (never changed) by a step
    schedule_state: dict | None = None
    # a fork's origin, {"session", "step"}, and the digest of the request that made it (its retries match it)
    forked_from: dict | None = None
    fork_request: str | None = None
    version: int = 0  # every write bumps it; the store's compare-and-set fences on it
    buffer: np.ndarray | None = None  # uint8: the memory every array views, when loaded from a record
    slots: Slots | None = None  # where in ``buffer`` each array lives
    arrays: Arrays | None = None  # ``params`` and ``states`` when they view ``buffer``
    # bounds of max|x| of the state as this process last stepped it (``optim.base.Top``), for the next
    # step's proof that it may go in place; never stored: None until measured
    top: Top | None = None
    unproven_until: int = 0  # the step before which the bound is not measured again (it failed measured)

    @cached_property
    def config_json(self) -> bytes:
        return orjson.dumps(self.config.model_dump(mode="json"))

    @cached_property
    def hyperparameters(self) -> list:
        return _hyperparameters(self.config_json, self.layout.names)

    def fork(self, copy: bool = True, memory: np.ndarray | None = None) -> Session:
        """A private, writable copy of a session loaded from a record: what a step works on, so
        that a refused step leaves the original (still the stored record) untouched. With
        ``copy=False`` its arrays are fresh memory (or ``memory``, uint8 of the record's length),
        for an update that reads this session and writes every element (``apply_step(...,
        source=self.source())``): one pass over memory, not two. A version 1 record is laid out
        anew, so the step writes it back as the current version."""
        clone = object.__new__(Session)
        clone.__dict__.update(self.__dict__)  # the parsed config and hyperparameters too (4x copy.copy's speed)
        clone.__dict__.pop("_all", None)  # views of this session's memory, not the clone's
        clone.__dict__.pop("_flat", None)
        if memory is not None and (copy or len(memory) != len(self.buffer)):
            memory = None
        relaid = self.slots.schema != SCHEMA_VERSION
        if relaid:
            clone.slots = _slots(self.layout, self.config.optimizer.type, self.slots.buffer_names)
        if copy and not relaid:
            clone.buffer = self.buffer.copy()
        else:
            clone.buffer = POOL.take(clone.slots.end) if memory is None else memory
        if clone.slots.kinds is None:  # one tensor, or unlike ones: no flat form to make (``flat``)
            clone._flat = None
        clone.arrays = Arrays(clone.slots, clone.buffer)
        clone.params, clone.states = clone.arrays.lists()
        clone.top = None
        if copy and relaid:
            for param, state, source in zip(clone.params, clone.states, zip(self.params, self.states)):
                adopt(param, state, source)
        return clone

    def fork_in_place(self) -> Session:
        """This session over its own memory, writable: a step that updates the stored state itself
        (``SessionService`` proves it safe first: nothing else reads that memory, no value can
        come out non-finite)."""
        clone = object.__new__(Session)
        clone.__dict__.update(self.__dict__)
        for array in self._own_views():
            array.flags.writeable = True
        return clone

    def alone(self, record: SessionRecord) -> bool:
        """Nothing but this session and ``record`` (the store's, as a view of the same memory) refers
        to its memory: no answer still being sent, no reader's view, no snapshot. Each of those
        holds a reference to the buffer (a numpy view's base, a memoryview's exporter) or to one
        of this session's own views, each of which its one container (a list, a NamedTuple, this
        session) holds once. (Whoever holds this Session itself is the service's own code, which
        reads it without awaiting in between.)"""
        buffer = self.buffer
        if buffer is None or not buffer.flags.owndata:
            return False
        held = 2  # this session's and its Arrays' attributes
        for view in self._own_views()[1:]:
            if sys.getrefcount(view) > 4:  # its container, the list, the name ``view``, getrefcount's argument
                return False
            held += view.base is buffer
        data = record.data
        held += isinstance(data, memoryview) and data.obj is buffer
        return sys.getrefcount(buffer) - 2 == held  # less getrefcount's argument and the name ``buffer``

    def _own_views(self) -> list[np.ndarray]:
        """The buffer, then every view of it this session keeps (laid arrays, the flat runs and the
        parameters' run), each once."""
        flat, every = self.__dict__.get("_flat"), self.__dict__.get("_all")
        views = [self.buffer, *(self.arrays.laid() if self.arrays is not None else ()),
                 *((flat[0], *flat[1]) if flat is not None else ()), *((every,) if every is not None else ())]
        seen: dict[int, np.ndarray] = {}
        for view in views:
            if view is not None:
                seen.setdefault(id(view), view)
        return list(seen.values())

    def source(self) -> tuple[list[np.ndarray], list[tuple], tuple | None]:
        """This session's arrays as ``apply_step`` reads them for a fork made with ``copy=False``."""
        return self.params, self.states, self.flat()

    def flat(self) -> tuple[np.ndarray, tuple] | None:
        """The whole session as one parameter array and one array per buffer kind, when every
        tensor holds the same buffers (views of the session's memory, like its arrays; made once)."""
        if "_flat" not in self.__dict__:
            self._flat = self.slots.flat(self.buffer) if self.slots is not None else None
        return self._flat

    def all_params(self) -> np.ndarray:
        """Every parameter as one 1-D run: a view of the session's memory (made once), or a copy
        joined from its arrays when it has none."""
        if self.buffer is None:
            return np.frombuffer(self.params_bytes(), self.layout.np_dtype)
        if "_all" not in self.__dict__:
            self._all = self.buffer[:self.layout.nbytes].view(self.layout.np_dtype)
        return self._all

    def freeze(self) -> None:
        """Make its memory and the arrays laid so far read-only: this session is the stored state
        now, which the next step reads and nothing writes. (The kernels take what they only read
        as read-only arrays: the next step need not make read-only views of these.)"""
        for array in self._own_views():
            array.flags.writeable = False

    def buffers(self, i: int) -> dict[str, np.ndarray]:
        state = self.states[i]
        return {k: v for k, v in zip(state._fields, state) if v is not None}

    def meta(self) -> dict:
        return {
            "schema_version": self.slots.schema if self.slots is not None else SCHEMA_VERSION,  # as laid out
            "step": self.step,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "loss": self.loss,
            "skipped_steps": self.skipped_steps,
            **({"tensor_steps": list(self.tensor_steps)} if self.tensor_steps is not None else {}),
            **({"schedule_state": self.schedule_state} if self.schedule_state is not None else {}),
            **({"forked_from": self.forked_from, "fork_request": self.fork_request} if self.forked_from else {}),
            "config": orjson.Fragment(self.config_json),
            "dtype": self.layout.dtype,
            "structure": self.layout.structure,
            "tensors": self.slots.tensors if self.slots is not None
            else _tensors_json(self.layout, tuple(tuple(self.buffers(i)) for i in range(len(self.states)))),
        }

    def params_bytes(self) -> memoryview | bytes:
        """Every parameter's bytes, in creation order: a view of the session's memory when it has one."""
        if self.buffer is not None:
            return memoryview(self.buffer)[: self.layout.nbytes]
        return b"".join(np.ascontiguousarray(p).data for p in self.params)

    def to_record(self) -> SessionRecord:
        if self.buffer is not None:  # the arrays were updated in place: the buffer is the record
            data = self.buffer.data
        else:
            kinds = range(len(self.states[0])) if self.states else ()
            chunks = [*self.params, *(s[k] for k in kinds for s in self.states if s[k] is not None)]
            data = b"".join(np.ascontiguousarray(c).data for c in chunks)
        return SessionRecord(self.id, self.owner, self.version, orjson.dumps(self.meta()), data)


@lru_cache(maxsize=4096)
def _tensors_json(layout: Layout, buffer_names: tuple[tuple[str, ...], ...]) -> orjson.Fragment:
    """The meta's tensor list, written once per layout rather than on every step."""
    return orjson.Fragment(orjson.dumps([{"name": n, "shape": list(s), "buffers": list(b)}
                                         for n, s, b in zip(layout.names, layout.shapes, buffer_names)]))


def read_meta(record: SessionRecord) -> dict:
    meta = orjson.loads(record.meta)
    if meta.get("schema_version") not in READABLE_SCHEMAS:
        raise ValueError(f"record {record.id} has schema_version {meta.get('schema_version')}")
    return meta


def layout_from_meta(meta: dict) -> Layout:
    return Layout(
        names=tuple(t["name"] for t in meta["tensors"]),
        shapes=tuple(tuple(t["shape"]) for t in meta["tensors"]),
        dtype=meta["dtype"],
        structure=meta["structure"],
    )


def from_record(record: SessionRecord, private: bool = True) -> Session:
    """Rebuild a session with private, writable arrays (one copy of the record's bytes), or with
    ``private=False`` as read-only views of the record itself: a template for ``fork``."""
    meta = read_meta(record)
    config_json = orjson.dumps(meta["config"])
    config = parse_config(config_json)
    layout = layout_from_meta(meta)
    buf = np.frombuffer(memoryview(record.data).toreadonly(), np.uint8)  # read-only views of the record
    if private:
        buf = buf.copy()
    slots = _slots(layout, config.optimizer.type, tuple(tuple(t["buffers"]) for t in meta["tensors"]),
                   meta["schema_version"])
    if slots.end != len(buf):
        raise ValueError(f"record {record.id}: {len(buf)} data bytes, layout needs {slots.end}")
    arrays = Arrays(slots, buf)
    params, states = arrays.lists()
    session = Session(
        id=record.id, owner=record.owner, config=config, layout=layout, step=meta["step"],
        params=params, states=states,
        created_at=meta["created_at"], updated_at=meta["updated_at"], loss=meta["loss"],
        skipped_steps=meta["skipped_steps"], version=record.version, buffer=buf, slots=slots, arrays=arrays,
        tensor_steps=tuple(meta["tensor_steps"]) if "tensor_steps" in meta else None,
        schedule_state=meta.get("schedule_state"), forked_from=meta.get("forked_from"),
        fork_request=meta.get("fork_request"),
    )
    session.config_json = config_json  # what the record holds, so the next record repeats it exactly
    return session
