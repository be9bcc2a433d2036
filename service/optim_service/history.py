"""A session's history: one line per step, appended by the step's own compare-and-set.

Each entry holds what the loss-curve lessons read training by: the step, its time, the loss the
client sent, the learning rate each param group used, the gradient norm before clipping and whether
clipping applied, and per tensor the update-to-parameter RMS ratio (how far a step moves each tensor
relative to its size: ~1e-3 is the rule of thumb; far below crawls). It also keeps a 16-number
sketch of the update's direction, so that the diagnosis can tell when successive updates point
against each other (the zig-zag across a valley) without storing the updates themselves. Ratios and
sketches come from at most ``SAMPLE`` elements of the parameters, taken at a fixed stride, so a
step of any size pays a few microseconds for them.
"""

from __future__ import annotations

import csv
import io
import math
import time
from functools import lru_cache

import numpy as np
import orjson

SAMPLE = 4096  # parameters sampled for the ratios and the sketch, across all tensors
SKETCH = 16  # numbers in the update's direction sketch
ENTRY_BYTES = 400  # a generous size of one entry before its per-tensor ratios, for the byte budget
RATIO_BYTES = 40  # per tensor


def reserve(steps: int, tensors: int) -> int:
    """The bytes a session's history may hold: ``steps`` recent entries and as many downsampled."""
    return 2 * steps * (ENTRY_BYTES + RATIO_BYTES * tensors)


@lru_cache(maxsize=64)
def _projection(size: int, dtype: str) -> np.ndarray:
    """A fixed ±1 projection of a sampled update onto ``SKETCH`` directions (Johnson–Lindenstrauss:
    cosines between sketches follow cosines between the sampled updates), in the update's dtype."""
    return np.random.default_rng(size).choice((-1.0, 1.0), size=(size, SKETCH)).astype(dtype)


@lru_cache(maxsize=1024)
def _sampling(sizes: tuple[int, ...]) -> tuple[int, np.ndarray, tuple[bool, ...]]:
    """The stride over all parameters (one run, in creation order), where each tensor's samples
    start among the sampled ones, and which tensors got any."""
    total = sum(sizes)
    stride = max(1, math.ceil(total / SAMPLE))
    offsets = np.cumsum((0, *sizes[:-1]))
    starts = -(-offsets // stride)  # the first sampled index at or after each tensor's start
    ends = -(-(offsets + np.asarray(sizes)) // stride)
    return stride, starts, tuple(bool(e > s) for s, e in zip(starts, ends))


def grad_norm(grads) -> float:
    """The L2 norm over every gradient (torch's clip_grad_norm_ total), before clipping."""
    whole = getattr(grads, "whole", None)
    if whole is None and len(grads) == 1:
        whole = grads[0].reshape(-1)
    if whole is not None:
        return math.sqrt(float(whole @ whole))
    return math.sqrt(sum(float(g.reshape(-1) @ g.reshape(-1)) for g in grads if g is not None))


def entry(step: int, old: np.ndarray, new: np.ndarray, names, sizes, *, loss, lrs, norm, clipped, worker,
          skipped) -> bytes:
    """One step's line, as JSON bytes. ``old`` and ``new`` are every parameter as one 1-D run."""
    doc = {"step": step, "time": round(time.time(), 3), "loss": loss, "lr": lrs, "grad_norm": norm,
           "clipped": clipped, "skipped": skipped, "worker": worker}
    if not skipped:
        stride, starts, sampled = _sampling(tuple(sizes))
        before = old[::stride]
        delta = new[::stride] - before
        if len(starts) == 1:  # one tensor: two dot products, no arrays of ratios
            scale = float(before @ before)
            doc["ratio"] = {names[0]: math.sqrt(float(delta @ delta) / scale) if scale > 0 else None}
        else:
            moved, scale = np.add.reduceat(delta * delta, starts), np.add.reduceat(before * before, starts)
            ratios = np.sqrt(np.divide(moved, scale, out=np.full(len(starts), np.nan), where=scale > 0)).tolist()
            doc["ratio"] = {n: (r if any_ and math.isfinite(r) else None) for n, r, any_ in zip(names, ratios, sampled)}
        doc["u"] = delta @ _projection(delta.size, delta.dtype.str)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def parse(entries: list[bytes]) -> list[dict]:
    return [orjson.loads(e) for e in entries]


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
