"""What every optimizer is: a hyperparameter model plus a pure-shaped ``init`` / ``update`` pair.

Like optax, an optimizer is data, not a class hierarchy: ``Optimizer`` bundles a validated
hyperparameter model with two functions over a small per-tensor NamedTuple state whose field names
are torch's buffer names (``exp_avg``, ``square_avg``, ...). Unlike optax, ``update`` writes into the
arrays it is given, as torch's functional core does: the session layer hands it a private working
copy, or the stored state itself where the optimizer's ``bound`` proves the update cannot write a
non-finite value (``Bounds``), and working in place is what keeps a 10M-parameter step at a few
copies of memory.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Annotated, Any, Callable, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Strict

# JSON numbers for hyperparameters: ints are fine, booleans and strings are not.
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class Hyperparameters(BaseModel):
    """Base for each optimizer's hyperparameters: unknown names and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


# How a state buffer's shape follows its parameter's (``Optimizer.shapes``): most are the parameter's
# own; NAdam's ``mu_product`` and ASGD's ``eta`` are one number; Adafactor keeps a matrix's second
# moment as a row and a column (torch's shapes: the last dimension 1, or the second-to-last).
PARAM, SCALAR, ROW, COLUMN = "param", "scalar", "row", "column"


def buffer_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == PARAM:
        return shape
    if kind == SCALAR:
        return ()
    if kind == ROW:
        return (*shape[:-1], 1)
    if kind == COLUMN:
        return (*shape[:-2], 1, shape[-1])
    raise ValueError(f"unknown buffer shape {kind!r}")


class Optimizer(NamedTuple):
    """A named recipe: hyperparameter model + ``init(param, hp)`` + ``update(param, grad, state, hp, step)``.

    ``update`` is called once per tensor per step with ``step`` counting from 1 (torch's ``state["step"]``
    after its increment); it updates ``param`` and the state buffers in place. ``fused`` does the same
    in one compiled pass (``kernels.py``), bit for bit, and returns how many elements came out
    non-finite; given ``source=(param, state)`` it reads the current values there and writes the new
    ones to ``param`` and ``state``, whatever those held. Without a kernel, ``fused`` is the
    reference (``reference_step``).

    The rest is what the service derives from the registry: ``shapes`` (buffer → ``PARAM``,
    ``SCALAR``, ``ROW``, ``COLUMN``; unnamed buffers are ``PARAM``) lays out the stored record and
    checks a checkpoint; ``torch`` names the torch.optim class it equals (None: beyond torch);
    ``warm`` lists the hyperparameter variants whose kernels compile at start-up; ``constructor_wide``
    the hyperparameters torch reads from the constructor even where a param group sets its own;
    ``check_shape`` refuses a parameter the algorithm cannot take (a message, or None);
    ``elementwise`` is False for an update that reads a whole tensor (a norm, a matrix product), which
    must never run over several tensors joined. ``bound`` proves an update cannot write a non-finite
    value, so that the service may run it in place (``Bounds``).
    """

    name: str
    hyperparameters: type[Hyperparameters]
    init: Callable[[np.ndarray, Any], tuple]
    update: Callable[[np.ndarray, np.ndarray, Any, Any, int], None]
    fused: Callable[..., int]
    state_type: type
    summary: str
    nonnegative_buffers: tuple[str, ...] = ()  # sums or averages of squares: a restored one must be >= 0
    shapes: Mapping[str, str] = MappingProxyType({})
    torch: str | None = None
    warm: tuple[dict, ...] = ()
    constructor_wide: tuple[str, ...] = ()
    check_shape: Callable[[tuple[int, ...]], str | None] | None = None
    elementwise: bool = True  # each element's update reads only that element: tensors may be joined
    # bound(hp, step, top, g, dtype): the maxima after this update, given ``top`` before it (``Top``)
    # and max|g|, proven to stay finite, or ``Unproven``; None: the update always goes out of place
    bound: Callable[..., Top] | None = None


    def buffer_shape(self, buffer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return buffer_shape(self.shapes.get(buffer, PARAM), shape)

    @property
    def param_shaped(self) -> bool:
        """Every buffer has its parameter's shape: each kind can be stored as one run over all tensors."""
        return all(kind == PARAM for kind in self.shapes.values())


class Top(NamedTuple):
    """Upper bounds of max|x| over a session: its parameters, and each buffer (the optimizer's state
    NamedTuple holding floats, None where no tensor keeps that buffer)."""

    param: float
    state: tuple


class Unproven(Exception):
    """An update's bound does not hold: it may write a non-finite value, so it goes out of place."""


class Bounds:
    """Interval arithmetic for an update in ``dtype``, upward: each call bounds |x| of a sum of
    bounded terms, grown by ``SLACK`` for the kernel's rounding (each operation is within 2⁻²⁴ of
    exact in float32; a bound covers at most a dozen) and by ``STEPS`` of the smallest subnormal
    (among subnormals rounding is within half of that, not relative), and raises ``Unproven`` unless
    it stays under ``limit``, the dtype's largest value over ``MARGIN``. A comparison with NaN is
    false, so a NaN anywhere is unproven too."""

    SLACK = 1 + 1e-6
    STEPS = 16
    MARGIN = 1024.0

    def __new__(cls, dtype):  # one per dtype: a bound is computed on every large step
        dtype = np.dtype(dtype)
        if dtype not in _BOUNDS:
            self = _BOUNDS[dtype] = super().__new__(cls)
            self.limit = float(np.finfo(dtype).max) / cls.MARGIN
            self.tiny = float(np.finfo(dtype).tiny)
            self.floor = cls.STEPS * float(np.finfo(dtype).smallest_subnormal)
            self.code = {4: "f", 8: "d"}[dtype.itemsize]
        return _BOUNDS[dtype]

    def __call__(self, *terms: float) -> float:
        return self._under_limit(sum(terms) * self.SLACK + self.floor)

    def _under_limit(self, x: float) -> float:
        if not x <= self.limit:
            raise Unproven
        return x

    def cast(self, scalars: tuple) -> list[float]:
        """|c| for each scalar as the kernel casts it (``f = p.dtype.type``), rounded to nearest: an lr
        past float32 is inf there, an eps under its smallest subnormal is 0 (and stays 0 here, no
        floor added: ``positive`` refuses it as a divisor)."""
        return [self._under_limit(abs(c) * self.SLACK) for c in array(self.code, scalars)]

    def ratio(self, g: float, eps: float, weight: float = 1.0) -> float:
        """|g|/(√s + ε) where s ≥ (weight·g)·g as the kernel rounds it (a sum of squares that holds this
        gradient's): at most 1/√weight, or t/ε for a |g| under t, whose square may fall into
        subnormals (where rounding is no longer relative); never more than |g|/ε."""
        loose = g / eps
        if not weight >= 1e-30:
            return self(loose)
        t = 2 * math.sqrt(self.tiny / weight)
        return self(min(loose, max(1 / math.sqrt(weight), t / eps)))

    @staticmethod
    def positive(*xs: float) -> None:
        """A divisor is never 0 (nor NaN)."""
        if not all(x > 0 for x in xs):
            raise Unproven


_BOUNDS: dict[np.dtype, Bounds] = {}


def reference_step(update):
    """``fused`` for an optimizer without a kernel: its numpy ``update`` through ``reference``."""
    def fused(param, grad, state, hp, step, source=None) -> int:
        return reference(update, param, grad, state, hp, step, source)
    return fused


def require_non_negative(hp: Hyperparameters, **labels: str) -> None:
    """torch's constructor checks, in torch's order and words: ``Invalid learning rate: -1.0``."""
    for field, label in labels.items():
        value = getattr(hp, field)
        if not 0.0 <= value:
            raise ValueError(f"Invalid {label}: {value}")


def directed(param: np.ndarray, grad: np.ndarray, hp) -> np.ndarray:
    """The gradient as torch's optimizers first shape it: negated for ``maximize``, then weight decay,
    coupled (g + λθ) or, with ``decoupled_weight_decay``, applied to θ in place (θ ← θ(1 − ηλ))."""
    if getattr(hp, "maximize", False):
        grad = -grad
    decay = getattr(hp, "weight_decay", 0.0)
    if decay != 0:
        if getattr(hp, "decoupled_weight_decay", False):
            param *= 1 - hp.lr * decay
        else:
            grad = grad + decay * param
    return grad


def decay_scalars(hp) -> tuple[float, float, float]:
    """``directed``'s (sign, coupled λ, decay factor) as a kernel takes them."""
    decay = getattr(hp, "weight_decay", 0.0)
    decoupled = getattr(hp, "decoupled_weight_decay", False) and decay != 0
    return (-1.0 if getattr(hp, "maximize", False) else 1.0, 0.0 if decoupled else decay,
            1 - hp.lr * decay if decoupled else 1.0)


def zeros(like: np.ndarray) -> np.ndarray:
    """A fresh optimizer buffer: zeros of ``like``'s shape and dtype. ``np.zeros`` takes them from
    calloc, whose pages hold no memory until written; ``np.zeros_like`` writes every one, which made a
    new 10M Adam session peak 2 parameter-sized copies higher (bench/memory.py)."""
    return np.zeros(like.shape, like.dtype)


def flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view for a kernel to write through (never a copy). A 1-D array is one already: the
    session's arrays usually are, and asking for its flags and a reshape cost more than a small
    update."""
    if array.ndim == 1:
        return array
    if not array.flags.c_contiguous:
        raise ValueError("kernels write in place: arrays must be C-contiguous")
    return array.reshape(-1)


def read_from(param: np.ndarray, state: tuple, source: tuple | None) -> tuple[np.ndarray, tuple]:
    """The arrays an update reads: ``source`` (param, state), the stored values when a step writes a
    fresh working copy, or the written arrays themselves for an update in place."""
    return source if source is not None else (param, state)


def adopt(param: np.ndarray, state: tuple, source: tuple | None) -> None:
    """Copy ``source`` into the arrays an in-place update (the numpy reference) then works on."""
    if source is not None:
        param[...] = source[0]
        for target, value in zip(state, source[1]):
            if target is not None:
                target[...] = value


def flat_read(array: np.ndarray) -> np.ndarray:
    """A 1-D, read-only view of values a kernel only reads (current values, a gradient), typed
    read-only whatever the array is: numba compiles a kernel once per argument type, and
    ``warm_kernels`` compiles the read-only one at start-up."""
    view = array if array.ndim == 1 else flat(array)
    if view.flags.writeable:  # a read-only array (the stored state, mostly) needs no view of its own
        view = view.view()
        view.flags.writeable = False
    return view


def piece(flat: np.ndarray, offset: int, size: int, shape: tuple[int, ...]) -> np.ndarray:
    """``size`` elements of ``flat`` from ``offset``, in ``shape``; a 1-D one is the slice itself (a
    reshape per array showed in a small step)."""
    run = flat[offset:offset + size]
    return run if len(shape) == 1 else run.reshape(shape)


class Run(Sequence):
    """Per-tensor arrays that are consecutive pieces of one 1-D array, ``whole`` (a binary body's
    gradients): a step over the whole session as one array (``apply_step``) takes ``whole`` as it
    is, and the pieces are cut only when one is read (a 100-tensor step: 200 reshapes and a join
    fewer)."""

    __slots__ = ("whole", "_shapes", "_pieces")

    def __init__(self, whole: np.ndarray, shapes: tuple[tuple[int, ...], ...]):
        self.whole, self._shapes, self._pieces = whole, shapes, None

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index):
        return self._cut()[index]

    def __iter__(self):
        return iter(self._cut())

    def _cut(self) -> list[np.ndarray]:
        if self._pieces is None:
            pieces, offset = [], 0
            for shape in self._shapes:
                size = math.prod(shape)
                pieces.append(piece(self.whole, offset, size, shape))
                offset += size
            self._pieces = pieces
        return self._pieces


def joined(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Every array's elements in order, as one 1-D array (no copy for a ``Run``)."""
    if isinstance(arrays, Run):
        return arrays.whole
    return np.concatenate([a.reshape(-1) for a in arrays])


def reference(update, param, grad, state: tuple, hp, step: int, source: tuple | None = None) -> int:
    """The numpy reference as a kernel stand-in: ``update`` in place (after copying ``source`` in),
    then how many of the arrays came out non-finite. Overflow is counted, not warned about."""
    if source is not None and np.may_share_memory(grad, param):  # adopt would overwrite it
        grad = grad.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        adopt(param, state, source)
        update(param, grad, state, hp, step)
        return non_finite(grad, param, *state)


def non_finite(*arrays: np.ndarray | None) -> int:
    """How many arrays hold a NaN or ±Inf: the fused kernels' report, for the numpy path."""
    return sum(not np.isfinite(a).all() for a in arrays if a is not None)


def lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """In-place ``torch.lerp_``, with torch's two-sided formula so results agree to the last bit."""
    if weight < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1.0 - weight)
