"""A session's history: one line per step, appended by the step's own compare-and-set.

Each entry holds what the loss-curve lessons read training by: the step, its time, the loss the
client sent, the learning rate each param group used, the gradient norm before clipping and whether
clipping applied, and per tensor the update-to-parameter RMS ratio (how far a step moves each tensor
relative to its size: ~1e-3 is the rule of thumb; far below crawls). It also keeps a 16-number
count sketch of the update's direction, so that the diagnosis can tell when successive updates point
against each other (the zig-zag across a valley) without storing the updates themselves. Ratios and
sketches come from at most ``SAMPLE`` elements of the parameters, taken at a fixed stride, so a
step of any size pays a few microseconds for them.
"""

from __future__ import annotations

import csv
import io
import math
import struct
import time
from array import array
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import orjson
from numba import njit, prange

from .optim.kernels import PARALLEL_MIN_ELEMENTS, compiled, magnitude, magnitude_bits, magnitude_mask, run

SAMPLE = 4096  # parameters sampled for the ratios and the sketch, across all tensors
SKETCH = 16  # numbers in the update's direction sketch
ENTRY_BYTES = 400  # a generous size of one entry before its per-tensor ratios, for the byte budget
RATIO_BYTES = 40  # per tensor


def reserve(steps: int, tensors: int) -> int:
    """The bytes a session's history may hold: ``steps`` recent entries and as many downsampled."""
    return 2 * steps * (ENTRY_BYTES + RATIO_BYTES * tensors)


class Plan(NamedTuple):
    """How a layout's parameters are sampled: every ``stride``-th of them (one run, in creation
    order), ``samples`` in all; and where each tensor's samples start among them (a tensor with none
    shows a ratio of None: nothing moved over nothing)."""

    stride: int
    samples: int
    starts: np.ndarray


@lru_cache(maxsize=1024)
def _plan(sizes: tuple[int, ...]) -> Plan:
    total = sum(sizes)
    stride = max(1, math.ceil(total / SAMPLE))
    offsets = np.cumsum((0, *sizes[:-1]))
    starts = -(-offsets // stride)  # the first sampled index at or after each tensor's start
    return Plan(stride, -(-total // stride), starts.astype(np.int64))


@njit(inline="always")
def _hash(k):
    """Pseudo-random bits for sample ``k`` (murmur3's finaliser of k + 1), made where they are used."""
    h = ((k + 1) * 0x9E3779B1) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


# Sums may be reassociated: it lets the compiler vectorise Σg² (8× over 10M floats), and these are
# diagnostics, not the update (clipping takes its own exact norm). NaN and inf still propagate.
SUMS = {"reassoc", "contract"}


# One compiled pass over the sampled parameters: a line's measurements cost one call, not a dozen
# numpy calls whose code and data come back cold after the update
@njit(cache=True, nogil=True, error_model="numpy", fastmath=SUMS)
def _measure(old, new, grads, stride, samples, starts, sums):
    """Into ``sums`` (zeros, 2 per tensor + SKETCH + 1), over the samples: per tensor
    Σ(θ_new − θ_old)², then per tensor Σθ_old², then the update's count sketch (each sample added,
    with a hashed sign, into one of SKETCH hashed buckets: inner products, hence cosines, between
    sketches estimate those between the sampled updates without bias, at one add per sample where a
    dense ±1 projection took SKETCH); and last Σg² over every gradient. (Given, not returned: an
    array a compiled function makes is boxed on return, through a Python call of numba's, each step.)"""
    tensors, last = starts.size, starts.size - 1
    squares = 0.0
    for i in range(grads.size):
        g = np.float64(grads[i])
        squares += g * g
    sums[-1] = squares
    t = 0
    for k in range(samples):
        while t < last and k >= starts[t + 1]:
            t += 1
        before = np.float64(old[k * stride])
        delta = np.float64(new[k * stride]) - before
        sums[t] += delta * delta
        sums[tensors + t] += before * before
        bits = _hash(k)
        sums[2 * tensors + (bits & (SKETCH - 1))] += delta * (1.0 - 2.0 * ((bits >> 8) & 1))


def warm() -> None:
    """Compile (or load) the compiled passes for both dtypes, at start-up rather than on a first step."""
    for dtype in (np.float32, np.float64):
        for size in (2, PARALLEL_MIN_ELEMENTS):  # the serial and the parallel build
            grad_norm([np.ones(size, dtype)])
            grad_norm_and_max([np.ones(size, dtype)])
        entry(1, np.zeros(2, dtype), np.ones(2, dtype), (1, 1), loss=None, lrs=[0.1], norm=None,
              clip=None, worker=None, skipped=False, grads=np.ones(2, dtype))


def _sum_of_squares(x) -> float:
    total = 0.0
    for i in prange(x.size):
        v = np.float64(x[i])
        total += v * v
    return total


def _squares_and_top(x, bits, mask):
    """Σx² and the largest magnitude as bits (``kernels.magnitude_bits``), in one pass: an integer max
    vectorises beside the sum where a float one did not (13 ms over 10M, against 3.9)."""
    total, top = 0.0, bits.dtype.type(0)
    for i in prange(x.size):
        v = np.float64(x[i])
        total += v * v
        top = max(top, bits[i] & mask)
    return total, top


# on every core for a large run, as the update: one core does not saturate the memory bus (Σx² and
# max|x| of 10M float32: 1.4 → 0.8 ms)
_SUM_OF_SQUARES, _SQUARES_AND_TOP = compiled(_sum_of_squares, fastmath=SUMS), compiled(_squares_and_top, fastmath=SUMS)


def grad_norm_and_max(grads) -> tuple[float, float]:
    """``grad_norm`` and max|g| (inf where one is NaN or ±Inf) in the same pass: an update in place needs
    the second, and a binary step's line takes the first before the update anyway."""
    total, top = 0.0, 0.0
    for g in ([whole] if (whole := one_run(grads)) is not None else [g for g in grads if g is not None]):
        bits = magnitude_bits(g)
        squares, most = run(_SQUARES_AND_TOP, g.reshape(-1), bits, magnitude_mask(bits))
        total, top = total + squares, max(top, magnitude(most, g.dtype))
    return math.sqrt(total), top


def one_run(grads) -> np.ndarray | None:
    """Every gradient as one 1-D array without a copy (a binary body's run, or a single tensor's),
    else None."""
    whole = getattr(grads, "whole", None)
    if whole is None and len(grads) == 1 and grads[0] is not None:
        whole = grads[0].reshape(-1)
    return whole


def grad_norm(grads) -> float:
    """The L2 norm over every gradient (torch's clip_grad_norm_ total), before clipping."""
    whole = one_run(grads)
    if whole is not None:
        return math.sqrt(run(_SUM_OF_SQUARES, whole))
    return math.sqrt(sum(run(_SUM_OF_SQUARES, g.reshape(-1)) for g in grads if g is not None))


# A line is packed, not JSON: building a JSON document in the step (a dict, round(), orjson) cost
# ~20 µs of a 100-parameter step over the wire, cold after the update; a line is rendered when read.
# Layout (little-endian): HEADER, then one float64 per param group's lr, then the measurements
# (per tensor Σ(θ_new − θ_old)², per tensor Σθ_old², the SKETCH numbers, Σg²; none when skipped),
# then the worker's name in UTF-8. A line that starts with "{" is JSON, as earlier versions wrote.
VERSION = 2  # 1: the sketch was a dense ±1 projection, whose cosines do not mix with count sketches
HEADER = struct.Struct("<BBHIqddd")  # version, flags, lrs, measurements, step, time, loss, grad_norm
CLIPPED, SKIPPED, HAS_LOSS, HAS_NORM, HAS_WORKER = 1, 2, 4, 8, 16
_ONE_LR = struct.Struct("<d")


def sample(run: np.ndarray, sizes) -> np.ndarray:
    """The elements of ``run`` (every parameter, 1-D) a line measures, as one small array: an update
    in place keeps the old ones so (``entry(..., sampled=True)``)."""
    plan = _plan(sizes)
    return run[:plan.samples * plan.stride:plan.stride].copy()


class Pending:
    """A step's line measured when first read (``bytes(line)``), not before: a private store (the
    memory store's, ``store.base``) keeps it as committed, and the step reads it once its answer is
    sent, so that the measuring is not in the step's latency (19 µs of a small step over the wire).
    Until then it holds the sessions it measures, whose memory nothing writes meanwhile: the buffer
    pool hands out no buffer a session still holds, and an update in place writes only the warm
    session, which the step's own becomes at its settle, after this is measured."""

    __slots__ = ("_measure", "_line")

    def __init__(self, measure: Callable[[], bytes]):
        self._measure, self._line = measure, None

    def __bytes__(self) -> bytes:
        if self._line is None:
            self._line, self._measure = self._measure(), None
        return self._line


def entry(step: int, old: np.ndarray, new: np.ndarray, sizes, *, loss, lrs, norm, clip, worker,
          skipped, grads: np.ndarray | None = None, sampled: bool = False) -> bytes:
    """One step's line. ``old`` and ``new`` are every parameter as one 1-D run (``old`` only its
    ``sample`` when ``sampled``); ``grads``, the gradients as one run, gives the norm in the same
    pass when ``norm`` is None."""
    measured, count = b"", 0
    if not skipped:
        plan = _plan(sizes)
        stride = plan.stride
        if sampled:
            new, stride = sample(new, sizes), 1
        sums = np.zeros(2 * len(plan.starts) + SKETCH + 1)
        _measure(old, new, old[:0] if grads is None else grads, stride, plan.samples, plan.starts, sums)
        if grads is not None:
            norm = math.sqrt(sums[-1])
        measured, count = sums.tobytes(), len(sums)
    clipped = clip is not None and norm is not None and clip / (norm + 1e-6) < 1.0
    flags = (clipped * CLIPPED | skipped * SKIPPED | (loss is not None) * HAS_LOSS | (norm is not None) * HAS_NORM
             | bool(worker) * HAS_WORKER)
    head = HEADER.pack(VERSION, flags, len(lrs), count, step, time.time(), 0.0 if loss is None else loss,
                       0.0 if norm is None else norm)
    lrs = _ONE_LR.pack(lrs[0]) if len(lrs) == 1 else array("d", lrs).tobytes()
    return b"".join((head, lrs, measured, worker.encode() if worker else b""))


def decode(raw: bytes, names) -> dict:
    """A line as the API shows it: step, time, loss, lr per group, grad_norm, clipped, skipped,
    worker and, for a step taken, the update-to-parameter ratio per tensor and the sketch ``u``."""
    if raw[:1] == b"{":
        return orjson.loads(raw)
    version, flags, groups, count, step, at, loss, norm = HEADER.unpack_from(raw)
    offset = HEADER.size + 8 * groups
    doc = {"step": step, "time": round(at, 3), "loss": loss if flags & HAS_LOSS else None,
           "lr": array("d", raw[HEADER.size:offset]).tolist(), "grad_norm": norm if flags & HAS_NORM else None,
           "clipped": bool(flags & CLIPPED), "skipped": bool(flags & SKIPPED),
           "worker": bytes(raw[offset + 8 * count:]).decode() if flags & HAS_WORKER else None}
    if count:
        values = array("d", raw[offset:offset + 8 * count]).tolist()
        tensors = (count - SKETCH - 1) // 2
        doc["ratio"] = {n: _ratio(values[i], values[tensors + i]) for i, n in enumerate(names)}
        if version == VERSION:
            doc["u"] = values[2 * tensors:2 * tensors + SKETCH]
    return doc


def _ratio(moved: float, scale: float) -> float | None:
    if scale > 0:
        ratio = math.sqrt(moved / scale)
        return ratio if math.isfinite(ratio) else None
    return None


def parse(entries: list[bytes], names) -> list[dict]:
    return [decode(e, names) for e in entries]


def select(steps: list[dict], since: int | None, every: int | None) -> list[dict]:
    if since is not None:
        steps = [s for s in steps if s["step"] >= since]
    if every and every > 1:
        steps = [s for s in steps if s["step"] % every == 0]
    return steps


def to_csv(steps: list[dict]) -> str:
    """One row per step; ``lr`` per param group (``lr``, ``lr_1``, ...), a ratio column per tensor."""
    groups = max((len(s["lr"]) for s in steps), default=1)
    tensors = list(dict.fromkeys(n for s in steps for n in s.get("ratio", {})))
    header = ["step", "time", "loss", *["lr" if i == 0 else f"lr_{i}" for i in range(groups)], "grad_norm", "clipped",
              "skipped", "worker", *[f"ratio:{n}" if n else "ratio" for n in tensors]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for s in steps:
        lrs = list(s["lr"]) + [""] * (groups - len(s["lr"]))
        ratios = s.get("ratio", {})
        writer.writerow([s["step"], s["time"], _cell(s["loss"]), *map(_cell, lrs), _cell(s["grad_norm"]),
                         s["clipped"], s["skipped"], s["worker"] or "", *[_cell(ratios.get(n)) for n in tensors]])
    return out.getvalue()


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)
