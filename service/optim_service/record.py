"""A session in memory, and how it becomes a store record (JSON meta + raw tensor bytes) and back.

The meta carries ``schema_version``, the full training config (optimizer name and every
hyperparameter) and the tensor layout, so the record alone rebuilds the session anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
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
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * self.np_dtype.itemsize

    def shapes_json(self):
        shapes = [list(s) for s in self.shapes]
        return shapes[0] if self.structure == "array" else dict(zip(self.names, shapes))


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

    @cached_property
    def hyperparameters(self) -> list:
        return self.config.hyperparameters_for(list(self.layout.names))

    def buffers(self, i: int) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.states[i]._asdict().items() if v is not None}

    def meta(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "step": self.step,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "loss": self.loss,
            "skipped_steps": self.skipped_steps,
            "config": self.config.model_dump(mode="json"),
            "dtype": self.layout.dtype,
            "structure": self.layout.structure,
            "tensors": [
                {"name": n, "shape": list(s), "buffers": list(self.buffers(i))}
                for i, (n, s) in enumerate(zip(self.layout.names, self.layout.shapes))
            ],
        }

    def to_record(self) -> SessionRecord:
        chunks = []
        for i, p in enumerate(self.params):
            chunks.append(p)
            chunks.extend(self.buffers(i).values())
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


def from_record(record: SessionRecord) -> Session:
    """Rebuild a session with private, writable arrays (one copy of the record's bytes)."""
    meta = read_meta(record)
    config = TrainingConfig.model_validate(meta["config"])
    layout = layout_from_meta(meta)
    buf = bytearray(record.data)
    offset, params, states = 0, [], []
    state_type = config.algorithm.state_type
    for t, shape, size in zip(meta["tensors"], layout.shapes, layout.sizes):
        views = []
        for _ in range(1 + len(t["buffers"])):
            views.append(np.frombuffer(buf, layout.np_dtype, size, offset).reshape(shape))
            offset += size * layout.np_dtype.itemsize
        params.append(views[0])
        states.append(state_type(**dict(zip(t["buffers"], views[1:]))))
    if offset != len(buf):
        raise ValueError(f"record {record.id}: {len(buf)} data bytes, layout needs {offset}")
    return Session(
        id=record.id, owner=record.owner, config=config, layout=layout, step=meta["step"],
        params=params, states=states,
        created_at=meta["created_at"], updated_at=meta["updated_at"], loss=meta["loss"],
        skipped_steps=meta["skipped_steps"], version=record.version,
    )
