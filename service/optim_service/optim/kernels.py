"""Fused per-element update kernels (numba): one pass over memory per tensor, on every core.

Each kernel is the numpy reference of ``sgd.py`` / ``adagrad.py`` / ``rmsprop.py`` / ``adam.py``
written element by element, operation for operation, in the tensor's own dtype, so results are
identical (tests/test_kernels.py); the numpy modules stay the readable definition and the oracle.

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
The scalars (learning rate, betas, ...) come as one array ``c`` of the tensor's dtype: making nine
numpy scalars and having numba's dispatcher type each one cost more than a 100-element update.
Each kernel also reports, in the same pass, whether any gradient or output is non-finite
(``max|x| < inf`` is false for NaN and ±Inf alike), replacing a separate scan.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

def _finite(a, b, c, d):
    return max(max(abs(a), abs(b)), max(abs(c), abs(d))) < np.inf


def _sgd(p, g, p0, c):
    lr, sign, wd = c[0], c[1], c[2]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        pi = p0[i] - lr * gi
        p[i] = pi
        bad += not _finite(pi, gr, pi, pi)
    return bad


def _sgd_momentum(p, g, buf, p0, buf0, c):
    # momentum_now, grad_weight = (0, 1) on the first step (the buffer starts as the gradient),
    # else (momentum, 1 - dampening); (nesterov, plain) is (1, 0) or (0, 1), in the tensor's dtype
    # (a Python literal here would promote the sum to float64)
    lr, sign, wd, momentum_now = c[0], c[1], c[2], c[3]
    grad_weight, momentum, nesterov, plain = c[4], c[5], c[6], c[7]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        b = buf0[i] * momentum_now
        b = b + grad_weight * gi
        buf[i] = b
        step = nesterov * (gi + momentum * b) + plain * b
        pi = p0[i] - lr * step
        p[i] = pi
        bad += not _finite(pi, b, gr, pi)
    return bad


def _adagrad(p, g, s, p0, s0, c):
    clr, sign, wd, eps = c[0], c[1], c[2], c[3]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        si = s0[i] + gi * gi
        s[i] = si
        pi = p0[i] - clr * gi / (np.sqrt(si) + eps)
        p[i] = pi
        bad += not _finite(pi, si, gr, pi)
    return bad


def _rmsprop(p, g, sq, p0, sq0, c):
    # alpha, alpha_c = (0, 1) on the lessons' form's first step (σ⁰ = |g⁰|), else (α, 1 - α)
    lr, sign, wd, alpha, alpha_c, eps = c[0], c[1], c[2], c[3], c[4], c[5]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        v = sq0[i] * alpha
        v = v + alpha_c * gi * gi
        sq[i] = v
        pi = p0[i] - lr * gi / (np.sqrt(v) + eps)
        p[i] = pi
        bad += not _finite(pi, v, gr, pi)
    return bad


def _rmsprop_momentum(p, g, sq, buf, p0, sq0, buf0, c):
    lr, sign, wd, alpha, alpha_c, eps, momentum = c[0], c[1], c[2], c[3], c[4], c[5], c[6]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        gi = gi + wd * p0[i]
        v = sq0[i] * alpha
        v = v + alpha_c * gi * gi
        sq[i] = v
        b = buf0[i] * momentum
        b = b + gi / (np.sqrt(v) + eps)
        buf[i] = b
        pi = p0[i] - lr * b
        p[i] = pi
        bad += not _finite(pi, v, b, gr)
    return bad


def _adam(p, g, m, v, p0, m0, v0, c):
    # torch's lerp for weight b1_c < 0.5
    sign, wd, decay, b1_c, b2 = c[0], c[1], c[2], c[3], c[4]
    b2_c, eps, step_size, bc2_sqrt = c[5], c[6], c[7], c[8]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        pi = p0[i] * decay
        gi = gi + wd * pi
        mi = m0[i] + b1_c * (gi - m0[i])
        m[i] = mi
        vi = v0[i] * b2
        vi = vi + b2_c * gi * gi
        v[i] = vi
        pi = pi - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)
        p[i] = pi
        bad += not _finite(pi, mi, vi, gr)
    return bad


def _adam_amsgrad(p, g, m, v, vmax, p0, m0, v0, vmax0, c):
    sign, wd, decay, b1_c, b2 = c[0], c[1], c[2], c[3], c[4]
    b2_c, eps, step_size, bc2_sqrt = c[5], c[6], c[7], c[8]
    bad = 0
    for i in prange(p.size):
        gr = g[i]
        gi = gr * sign
        pi = p0[i] * decay
        gi = gi + wd * pi
        mi = m0[i] + b1_c * (gi - m0[i])
        m[i] = mi
        vi = v0[i] * b2
        vi = vi + b2_c * gi * gi
        v[i] = vi
        second = max(vmax0[i], vi)
        vmax[i] = second
        pi = pi - step_size * mi / (np.sqrt(second) / bc2_sqrt + eps)
        p[i] = pi
        bad += not _finite(pi, mi, second, gr)
    return bad


_finite = njit(inline="always")(_finite)
_FUNCTIONS = {"sgd": _sgd, "sgd_momentum": _sgd_momentum, "adagrad": _adagrad, "rmsprop": _rmsprop,
              "rmsprop_momentum": _rmsprop_momentum, "adam": _adam, "adam_amsgrad": _adam_amsgrad}
PARALLEL_MIN_ELEMENTS = 1 << 14  # below this, waking the other cores costs more than it saves


def _serial_twin(fn):
    """The same function under another name, so numba caches its serial build in its own file."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    return twin


# error_model "numpy": x/0 is IEEE's ±inf or NaN, as in numpy and torch, and the finite check refuses
# it. numba's default ("python") raised ZeroDivisionError (a 500 for an eps of 0 and a zero
# gradient), and its check per division kept LLVM from vectorising Adam (3x slower on some CPUs)
_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}
PARALLEL = {name: njit(parallel=True, **_OPTIONS)(fn) for name, fn in _FUNCTIONS.items()}
SERIAL = {name: njit(**_OPTIONS)(_serial_twin(fn)) for name, fn in _FUNCTIONS.items()}


def run(name: str, p: np.ndarray, *args) -> int:
    """Run kernel ``name`` over flat views (written arrays, the gradient, read arrays) and ``c``, its
    scalars in the tensor's dtype as one array; returns how many elements came out non-finite."""
    return (PARALLEL if p.size >= PARALLEL_MIN_ELEMENTS else SERIAL)[name](p, *args)
