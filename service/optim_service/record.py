"""A session in memory, and how it becomes a store record (JSON meta + raw tensor bytes) and back.

The meta carries ``schema_version``, the full training config (optimizer name and every
hyperparameter) and the tensor layout, so the record alone rebuilds the session anywhere. The data
holds every parameter in creation order, then each tensor's buffers: the parameters are one
contiguous run, so a binary answer is a slice of the session's memory, not a copy. A loaded session's
arrays are views into one private buffer, which becomes the next record as it is, again no copy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import orjson

from .optim.config import TrainingConfig
from .store import SessionRecord

SCHEMA_VERSION = 1
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
Structure = Literal["array", "object"]


@dataclass(frozen=True)
class Layout:
    """The tensors a session holds: names in creation order, shapes, dtype, and how the client nests them."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    structure: Structure

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
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


@dataclass(frozen=True)
class Slots:
    """Where each array lives in a record's data, in elements: every parameter in creation order,
    then each tensor's buffers. Computed once per layout; ``views`` lays them over any buffer."""

    dtype: np.dtype
    state_type: type  # the optimizer's NamedTuple
    params: tuple[tuple[int, int, tuple[int, ...]], ...]  # (offset, size, shape)
    states: tuple[tuple[tuple[int, int, tuple[int, ...]] | None, ...], ...]  # per tensor, per state field
    end: int  # the data's length in bytes

    def views(self, buf) -> tuple[list[np.ndarray], list[tuple]]:
        flat = np.frombuffer(buf, self.dtype)
        params = [flat[o:o + n].reshape(shape) for o, n, shape in self.params]
        states = [self.state_type(*[None if s is None else flat[s[0]:s[0] + s[1]].reshape(s[2]) for s in fields])
                  for fields in self.states]
        return params, states


@lru_cache(maxsize=4096)
def _slots(layout: Layout, state_type: type, buffer_names: tuple[tuple[str, ...], ...]) -> Slots:
    offset, params = 0, []
    for size, shape in zip(layout.sizes, layout.shapes):
        params.append((offset, size, shape))
        offset += size
    states = []
    for names, size, shape in zip(buffer_names, layout.sizes, layout.shapes):
        where = {name: (offset + k * size, size, shape) for k, name in enumerate(names)}
        if set(where) - set(state_type._fields):
            raise ValueError(f"buffers {sorted(where)} are not all {state_type.__name__} fields")
        states.append(tuple(where.get(field) for field in state_type._fields))
        offset += len(names) * size
    return Slots(layout.np_dtype, state_type, tuple(params), tuple(states), offset * layout.np_dtype.itemsize)


@dataclass
class Session:
    id: str
    owner: str | None
    config: TrainingConfig
    layout: Layout
    step: int  # optimizer steps applied: the ETag
    params: list[np.ndarray]
    states: list[tuple]  # one optimizer NamedTuple per tensor, buffers may be None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    loss: float | None = None  # the last loss a client reported with a step
    skipped_steps: int = 0  # steps refused by nan_policy "skip"
    version: int = 0  # every write bumps it; the store's compare-and-set fences on it
    buffer: bytearray | memoryview | None = None  # the memory every array views, when loaded from a record
    slots: Slots | None = None  # where in ``buffer`` each array lives

    @cached_property
    def config_json(self) -> bytes:
        return orjson.dumps(self.config.model_dump(mode="json"))

    @cached_property
    def hyperparameters(self) -> list:
        return _hyperparameters(self.config_json, self.layout.names)

    def fork(self) -> Session:
        """A private, writable copy of a session loaded from a record: what a step works on, so
        that a refused step leaves the original (still the stored record) untouched."""
        clone = object.__new__(Session)
        clone.__dict__.update(self.__dict__)  # keeps the parsed config and hyperparameters; copy.copy is 4x slower
        clone.buffer = bytearray(self.buffer)
        clone.params, clone.states = self.slots.views(clone.buffer)
        return clone

    def buffers(self, i: int) -> dict[str, np.ndarray]:
        state = self.states[i]
        return {k: v for k, v in zip(state._fields, state) if v is not None}

    def meta(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "step": self.step,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "loss": self.loss,
            "skipped_steps": self.skipped_steps,
            "config": orjson.Fragment(self.config_json),
            "dtype": self.layout.dtype,
            "structure": self.layout.structure,
            "tensors": [
                {"name": n, "shape": list(s), "buffers": list(self.buffers(i))}
                for i, (n, s) in enumerate(zip(self.layout.names, self.layout.shapes))
            ],
        }

    def params_bytes(self) -> memoryview | bytes:
        """Every parameter's bytes, in creation order: a view of the session's memory when it has one."""
        if self.buffer is not None:
            return memoryview(self.buffer)[: self.layout.nbytes]
        return b"".join(np.ascontiguousarray(p).data for p in self.params)

    def to_record(self) -> SessionRecord:
        if self.buffer is not None:  # the arrays were updated in place: the buffer is the record
            data = self.buffer
        else:
            chunks = [*self.params, *(b for i in range(len(self.params)) for b in self.buffers(i).values())]
            data = b"".join(np.ascontiguousarray(c).data for c in chunks)
        return SessionRecord(self.id, self.owner, self.version, orjson.dumps(self.meta()), data)


def read_meta(record: SessionRecord) -> dict:
    meta = orjson.loads(record.meta)
    if meta.get("schema_version") != SCHEMA_VERSION:
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
    buf = bytearray(record.data) if private else memoryview(record.data).toreadonly()
    slots = _slots(layout, config.algorithm.state_type, tuple(tuple(t["buffers"]) for t in meta["tensors"]))
    if slots.end != len(buf):
        raise ValueError(f"record {record.id}: {len(buf)} data bytes, layout needs {slots.end}")
    params, states = slots.views(buf)
    session = Session(
        id=record.id, owner=record.owner, config=config, layout=layout, step=meta["step"],
        params=params, states=states,
        created_at=meta["created_at"], updated_at=meta["updated_at"], loss=meta["loss"],
        skipped_steps=meta["skipped_steps"], version=record.version, buffer=buf, slots=slots,
    )
    session.config_json = config_json  # what the record holds, so the next record repeats it exactly
    return session
