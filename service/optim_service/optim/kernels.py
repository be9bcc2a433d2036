"""How an optimizer's fused kernel (numba) is built and run: one pass over memory per tensor, on
every core. Each kernel lives beside its numpy reference in the optimizer's own module.

A kernel is that module's reference written element by element, operation for operation, in the
tensor's own dtype, so results are identical (tests/test_kernels.py); the numpy ``update`` stays the
readable definition and the oracle.

The loop bodies are branch-free, because LLVM only vectorises them that way (a branchy body ran
10-20x slower, see bench/compute.py). Flags become exact arithmetic instead: ``sign`` is ±1 for
``maximize``, ``decay`` is 1 unless weight decay is decoupled, a coupled decay of 0 adds 0·θ.
Structural variants (momentum, AMSGrad) are separate kernels. Each kernel reads the current
values from one set of arrays (``p0``, ``m0``, ...) and writes the new ones to another (``p``, ``m``,
...): a step reads the stored state and writes its working copy in the same pass, instead of
copying the state first (for 1M Adam the copy took longer than the update). The two sets are the same
arrays for an update in place; each element is read before it is written, at its own index only.
The gradient ``g`` may be the memory of ``p`` too (a binary step's body is read straight into the
parameters of its working copy, ``SessionService.binary_memory``), so each kernel reads ``g[i]``
once, first, into ``gr``.
The scalars (learning rate, betas, ...) are the optimizer's ``Scalars`` NamedTuple of Python floats,
passed as the kernel's last arguments, one per field in its order (``apply`` unpacks it: numba's
dispatch took a NamedTuple argument 1 µs slower than its floats); the kernel casts them to the
tensor's dtype (``f = p.dtype.type``) before the loop, so a float32 update computes in float32 as
torch's does.
An update in place whose gradients lie in a client's live memory (a shared-memory step) passes
``guard``: (max|g| as measured before the update, 0). Each bounded kernel reads ``g[i]`` through
``guarded``, so a gradient the client changed since it was measured, beyond what the proof allowed,
counts as 0 and the update stays within its bound; ``UNGUARDED`` (∞, NaN) changes no value, NaN included.
A bounded kernel also writes each new parameter to ``q``: ``p`` itself, or, for an update in place
that answers into a client's region, that region (one pass fewer than copying the parameters there).
Each kernel also reports, in the same pass, whether any gradient or output is non-finite
(``max|x| < inf`` is false for NaN and ±Inf alike), replacing a separate scan.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Callable, NamedTuple

import numpy as np
from numba import njit, prange

from .base import flat, flat_read, read_from, reference

PARALLEL_MIN_ELEMENTS = 1 << 14  # below this, waking the other cores costs more than it saves


# The pieces every kernel's loop shares, inlined into it (LLVM vectorises the result as one body).

@njit(inline="always")
def finite(a, b, c, d):
    return max(max(abs(a), abs(b)), max(abs(c), abs(d))) < np.inf


@njit(inline="always")
def guarded(g, top, fill):
    """``g``, or ``fill`` where ``|g| ≤ top`` does not hold (a select, which vectorises)."""
    return g if abs(g) <= top else fill


UNGUARDED = (math.inf, math.nan)  # every value as it is: a NaN fails the test and is filled with NaN


@njit(inline="always")
def directed_at(gr, p0, sign, wd, decay):
    """(g, θ) as torch's optimizers first shape them: g·sign (±1 for maximize), θ·decay (1 − lr·λ when
    weight decay is decoupled, else 1), then g + λθ (λ 0 when decoupled)."""
    pi = p0 * decay
    return gr * sign + wd * pi, pi


@njit(inline="always")
def lerp(start, end, weight):
    """torch.lerp for a weight below 0.5 (an optimizer whose weight is not falls back to its reference)."""
    return start + weight * (end - start)


@njit(inline="always")
def ema_sq(v0, g, beta, beta_c):
    """v·β + (1 − β)·g², in torch's order (``mul_(β).addcmul_(g, g, value=1 − β)``)."""
    return v0 * beta + beta_c * g * g


@njit(inline="always")
def moments_at(m, v, m0, v0, i, gi, b1_c, b2, b2_c):
    """Adam's two moments of element ``i``, written to ``m`` and ``v`` and returned."""
    mi = lerp(m0[i], gi, b1_c)
    m[i] = mi
    vi = ema_sq(v0[i], gi, b2, b2_c)
    v[i] = vi
    return mi, vi


class Kernel(NamedTuple):
    parallel: Callable[..., int]
    serial: Callable[..., int]


def _serial_twin(fn):
    """The same function under another name, so numba caches its serial build in its own file."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    return twin


# error_model "numpy": x/0 is IEEE's ±inf or NaN, as in numpy and torch, and the finite check refuses
# it. numba's default ("python") raised ZeroDivisionError (a 500 for an eps of 0 and a zero
# gradient), and its check per division kept LLVM from vectorising Adam (3x slower on some CPUs)
_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}


KERNELS: dict[str, Kernel] = {}  # every kernel by its module and name, for start-up checks


def compiled(fn, **options) -> Kernel:
    """``fn`` (its loop a ``prange``) compiled twice: on every core, and serially for small arrays."""
    options = _OPTIONS | options
    return Kernel(njit(parallel=True, **options)(fn), njit(**options)(_serial_twin(fn)))


def kernel(fn) -> Kernel:
    """An optimizer's kernel, ``compiled`` and registered."""
    built = KERNELS[f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"] = compiled(fn)
    return built


def torch_lerp(update):
    """For ``fused``: a step whose β₁ makes the lerp weight 1 − β₁ ≥ 0.5 goes to the numpy ``update``,
    as torch's lerp switches formula there and the kernels have the other one only (a rare case)."""
    def wrap(fused):
        @functools.wraps(fused)
        def checked(param, grad, state, hp, step: int, source=None, **guard) -> int:
            if 1 - hp.betas[0] >= 0.5:  # (never in place: the bound refuses it, so never guarded)
                return reference(update, param, grad, state, hp, step, source)
            return fused(param, grad, state, hp, step, source, **guard)
        return checked
    return wrap


def apply(k: Kernel, param, grad, state: tuple, source, scalars, buffers: tuple[str, ...] | None = None,
          guard: tuple[float, float] | None = None, out=None) -> int:
    """Run kernel ``k`` as every optimizer's does: written ``param`` and ``buffers`` (default: every
    buffer ``state`` holds; either way in field order), the gradient, the values read (``source``, or the same
    arrays for an update in place), then ``scalars``; a bounded kernel's then ``guard`` and where it
    writes the new parameters a second time (``out``, or ``param`` itself)."""
    param0, state0 = read_from(param, state, source)
    written = [flat(param), flat_read(np.ascontiguousarray(grad, param.dtype))]  # (the gradient is only read)
    read = [flat_read(param0)]
    fields = state._fields
    for i, a in enumerate(state):
        if a is not None and (buffers is None or fields[i] in buffers):
            written.append(flat(a))
            read.append(flat_read(state0[i]))
    if guard is not None:
        scalars = (*scalars, *guard, written[0] if out is None else flat(out))
    return run(k, *written, *read, *scalars)


# max|x| over a float's bits as an unsigned integer with the sign masked off: finite magnitudes
# order as their bits do, NaN and ±Inf sit above every finite one, and an integer max vectorises
# (a float max, minding NaN, did not: 3x slower over 10M)
def _top_bits(bits, mask):
    top = bits.dtype.type(0)
    for i in prange(bits.size):
        top = max(top, bits[i] & mask)
    return top


_TOP_BITS = compiled(_top_bits)
_BITS = {np.dtype(np.float32): (np.uint32, np.float32), np.dtype(np.float64): (np.uint64, np.float64)}
_MASKS = {unsigned: unsigned(np.iinfo(unsigned).max >> 1) for unsigned, _ in _BITS.values()}


def magnitude_bits(x: np.ndarray) -> np.ndarray:
    """``x``'s elements as unsigned integers of their width (the same memory, 1-D)."""
    return np.ascontiguousarray(x).reshape(-1).view(_BITS[x.dtype][0])


def magnitude_mask(bits: np.ndarray):
    """What masks the sign off ``bits``."""
    return _MASKS[bits.dtype.type]


def top_bits(bits: np.ndarray) -> int:
    """The largest magnitude among ``bits`` (``magnitude_bits``), as bits: ``magnitude`` reads it."""
    if bits.size == 0:
        return 0
    return int(run(_TOP_BITS, bits, magnitude_mask(bits)))


def magnitude(top: int, dtype) -> float:
    """The float whose magnitude bits are ``top``: inf for any NaN or ±Inf."""
    unsigned, real = _BITS[np.dtype(dtype)]
    value = float(np.array(top, unsigned).view(real))
    return value if value == value else math.inf


def max_abs(x: np.ndarray) -> float:
    """max|x| in one pass; inf when any element is NaN or ±Inf."""
    return magnitude(top_bits(magnitude_bits(x)), x.dtype)


def _copy(dst, src):
    for i in prange(dst.size):
        dst[i] = src[i]


_COPY = njit(parallel=True, **_OPTIONS)(_copy)  # (below PARALLEL_MIN_BYTES numpy copies: no serial build)
PARALLEL_MIN_BYTES = 1 << 20  # a smaller copy is faster as numpy's one memcpy than on a woken team


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` for two 1-D arrays of one dtype: on every core when large (one core cannot
    saturate the memory bus: 10M float32 3.4 → 2.3 ms on 2 cores), else numpy's copy."""
    if dst.nbytes < PARALLEL_MIN_BYTES:
        np.copyto(dst, src)
    else:
        _COPY(dst, src)


def run(k: Kernel, p: np.ndarray, *args) -> int:
    """Run a kernel over flat views (written arrays, the gradient, read arrays) and its scalars;
    returns how many elements came out non-finite."""
    return (k.parallel if p.size >= PARALLEL_MIN_ELEMENTS else k.serial)(p, *args)
