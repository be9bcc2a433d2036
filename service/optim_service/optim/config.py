"""A session's training recipe: optimizer + hyperparameters, param groups, schedule and clipping.

``TrainingConfig`` is what a client sends and what the stored record keeps, so the exact optimizer
can be rebuilt anywhere. ``apply_step`` is the whole per-step pipeline: clip, schedule, update.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from . import OPTIMIZERS
from .base import Hyperparameters, Top, Unproven, adopt, joined, reference
from .kernels import PARALLEL_MIN_ELEMENTS, max_abs
from .aggregation import Aggregation, Each
from .clipping import ClipGradNorm, clip_coefficient
from .schedules import Schedule


def _with_type(name: str, hp_model: type[Hyperparameters]) -> type[Hyperparameters]:
    return create_model(
        f"{hp_model.__name__.removesuffix('Hyperparameters')}Config",
        __base__=hp_model,
        type=(Literal[name], ...),  # type: ignore[valid-type]
    )


OptimizerConfig = Annotated[
    Union[tuple(_with_type(n, o.hyperparameters) for n, o in OPTIMIZERS.items())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]


class ParamGroup(BaseModel):
    """Hyperparameter overrides for the named tensors in ``params`` (torch's param-group semantics)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    params: Annotated[list[str], Field(min_length=1)]


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: OptimizerConfig
    schedule: Schedule | None = None
    clip_grad_norm: ClipGradNorm | None = None
    param_groups: list[ParamGroup] = []
    aggregation: Aggregation = Field(Each(), description='how several workers\' gradients combine: '
                                     '"each" steps on every one, "sync" on the mean of a round, "async" '
                                     'scales a stale one (docs/training-together.md)')
    rollback_snapshots: Annotated[int, Field(ge=0, le=1000, strict=True)] | None = Field(
        None, description="how many of its last steps' states the session keeps for POST .../rollback "
        "(default OPTIM_ROLLBACK_SNAPSHOTS, 0 off); their bytes count against the key's budget")
    nan_policy: Literal["error", "skip"] = Field(
        "error", description='non-finite gradients or results: "error" refuses the step (422); '
        '"skip" leaves the state unchanged and answers {"skipped": true}, as AMP loss scaling does')

    @model_validator(mode="after")
    def _groups_are_valid(self):
        seen: set[str] = set()
        for i, group in enumerate(self.param_groups):
            if dup := seen.intersection(group.params):
                raise ValueError(
                    f"some parameters appear in more than one parameter group: {sorted(dup)}"
                )
            seen.update(group.params)
            self._group_hyperparameters(i)
        return self

    def _group_hyperparameters(self, i: int) -> Hyperparameters:
        overrides = dict(self.param_groups[i].model_extra or {})
        if "type" in overrides:
            raise ValueError(f"param_groups[{i}]: a group cannot change the optimizer type")
        merged = {**self.optimizer.model_dump(), **overrides}
        try:
            return type(self.optimizer).model_validate(merged)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"param_groups[{i}]: {msgs}") from None

    def hyperparameters_for(self, names: list[str]) -> list[Any]:
        """The hyperparameters of each named tensor: its group's, else the optimizer's."""
        unknown = {n for g in self.param_groups for n in g.params} - set(names)
        if unknown:
            raise ValueError(
                f"param_groups name tensors that are not in params: {sorted(unknown)}; "
                f"the tensors are {names}"
            )
        groups = [self._group_hyperparameters(i) for i in range(len(self.param_groups))]
        by_name = {n: hp for g, hp in zip(self.param_groups, groups) for n in g.params}
        return [by_name.get(n, self.optimizer) for n in names]

    @property
    def algorithm(self):
        return OPTIMIZERS[self.optimizer.type]

    def initial_states(self, names: Sequence[str], params: list[np.ndarray], hyperparameters: list[Any]) -> list[tuple]:
        """Each tensor's fresh optimizer state, as torch makes it: from its group's hyperparameters,
        except those torch reads from the constructor (``Optimizer.constructor_wide``). ValueError
        for a tensor the algorithm cannot take (Muon's 2-D only)."""
        algorithm = self.algorithm
        if algorithm.check_shape is not None:
            for name, param in zip(names, params):
                if (problem := algorithm.check_shape(param.shape)) is not None:
                    raise ValueError(f"{f'tensor {name!r}' if name else 'the tensor'}: {problem}")
        wide = {k: getattr(self.optimizer, k) for k in algorithm.constructor_wide}
        states = [algorithm.init(p, hp.model_copy(update=wide) if wide else hp) for p, hp in zip(params, hyperparameters)]
        for name, param, state in zip(names, params, states):
            for buffer, values in state._asdict().items():  # a buffer starts uniform: its first value says
                if values is not None and values.size and not np.isfinite(values.flat[0]):
                    raise ValueError(f"{f'tensor {name!r}' if name else 'the tensor'}: {algorithm.name} starts its "
                                     f"'{buffer}' at {float(values.flat[0])} in {param.dtype} (a hyperparameter "
                                     "past the dtype's range); choose one the dtype holds, or float64")
        return states

    def check_schedule(self, step: int) -> None:
        """Refuse now a schedule whose next step (after ``step``) has no finite learning rate, for
        any param group: ``ScheduleOverflow``."""
        if self.schedule is not None:
            for i in range(len(self.param_groups) + 1):
                hp = self.optimizer if i == len(self.param_groups) else self._group_hyperparameters(i)
                self.schedule.lr_at(hp.lr, step)

    @model_validator(mode="after")
    def _one_min_lr_per_group(self):
        schedule = self.schedule
        if schedule is not None and schedule.type == "reduce_on_plateau" and isinstance(schedule.min_lr, list):
            if len(schedule.min_lr) != len(self.param_groups) + 1:
                raise ValueError(f"expected {len(self.param_groups) + 1} min_lrs (the optimizer's own group, then each "
                                 f"of param_groups), got {len(schedule.min_lr)}")
        return self

    @model_validator(mode="after")
    def _cycled_momentum_has_a_buffer(self):
        """OneCycleLR cycles momentum (or Adam's beta1): an optimizer without either, or an SGD or
        RMSprop created without momentum (so with no momentum buffer to carry), cannot take it."""
        schedule = self.schedule
        if schedule is None or schedule.type != "onecycle" or not schedule.cycle_momentum:
            return self
        fields = type(self.optimizer).model_fields
        if "betas" in fields:
            return self
        if "momentum" not in fields:
            raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
        if self.optimizer.momentum == 0:
            raise ValueError("onecycle cycles momentum, and an optimizer created with momentum 0 keeps no momentum "
                             "buffer: give it a momentum above 0 (the schedule sets it from then on), or "
                             "cycle_momentum: false")
        return self


FLAT_MAX_AVERAGE = 1 << 14  # elements per tensor, on average, up to which a step is one update


def apply_step(
    config: TrainingConfig,
    hyperparameters: list[Any],
    params: list[np.ndarray],
    grads: list[np.ndarray],
    states: list[tuple],
    step: int,
    fused: bool = True,
    flat: tuple[np.ndarray, tuple] | None = None,
    source: tuple[list[np.ndarray], list[tuple], tuple | None] | None = None,
    steps: list[int] | None = None,
    lr_scale: float = 1.0,
    lr_of: dict[int, float] | None = None,
    guard: tuple[float, float] | None = None,
    out: np.ndarray | None = None,
) -> tuple[float | None, bool]:
    """Run optimizer step number ``step`` (from 1) in place, with the fused kernels or the numpy
    reference. Returns the gradient norm (when clipping) and whether every gradient, parameter and
    buffer is finite: when not, the arrays are half-updated and must be thrown away.

    ``flat`` is the same parameters and state as one array per kind (``Session.flat``). When every
    tensor shares one set of hyperparameters and the tensors are small, the step is one update over
    those, with the gradients joined: the same arithmetic element by element, without a call per
    tensor (100 tensors of 100 elements: 1.2 ms tensor by tensor, 0.11 ms in one update).

    ``source`` (params, states, their flat form or None) is where the current values are read when
    ``params`` and ``states`` are fresh memory that the step writes whole (``Session.fork(copy=False)``).

    A gradient of None skips its tensor, as torch skips a parameter whose ``.grad`` is None: its
    values are kept (copied from ``source``), and ``steps`` then gives each tensor its own step
    number (its count of updates, as torch's per-parameter ``state["step"]``); the schedule follows
    ``step``, the optimizer's. ``lr_scale`` multiplies the (scheduled) learning rate of this step: an
    asynchronous push's staleness scale. ``lr_of`` (id of a tensor's hyperparameters → lr) is the
    lr a stateful schedule (reduce_on_plateau) has set for each group. ``guard`` (max|g|, 0), for an
    update in place of gradients in a client's live memory, goes to a bounded kernel (``kernels.guarded``),
    and with it ``out``: where the new parameters go as well, one 1-D run in creation order, or None."""
    grad_norm, coef = None, 1.0
    partial = steps is not None
    if config.clip_grad_norm:  # its overflow shows in the norm (the updates count theirs): no warning
        with np.errstate(over="ignore", invalid="ignore"):
            grad_norm, coef = clip_coefficient([g for g in grads if g is not None] if partial else grads,
                                               config.clip_grad_norm)
    if (not partial and flat is not None and (source is None or source[2] is not None) and len(params) > 1
            and config.algorithm.elementwise
            and flat[0].size <= FLAT_MAX_AVERAGE * len(params)
            and all(hp is hyperparameters[0] for hp in hyperparameters)):
        params, states, hyperparameters = [flat[0]], [flat[1]], hyperparameters[:1]
        sources = [source[2] if source is not None else None]
        grads = [joined(grads)]
        outs = [out]
    else:  # (only here: a session's per-tensor arrays are laid when first read)
        sources = list(zip(source[0], source[1])) if source is not None else [None] * len(params)
        outs = [None] * len(params)
        if out is not None:  # each tensor's run of it
            ends = np.cumsum([p.size for p in params])
            outs = [out[end - p.size:end] for p, end in zip(params, ends)]
    if coef != 1.0:  # scaled copies: the gradients may be read-only views of a request body
        with np.errstate(over="ignore", invalid="ignore"):
            grads = [None if g is None else g * coef for g in grads]
    algorithm = config.algorithm
    scheduled: dict[int, Any] = {}
    rescheduled = config.schedule is not None or lr_scale != 1.0
    finite = True
    for i, (param, grad, state, hp, read, into) in enumerate(zip(params, grads, states, hyperparameters, sources, outs)):
        if grad is None or param.size == 0:  # skipped this step (or nothing to update): kept as it is
            adopt(param, state, read)
            continue
        if rescheduled:  # (the call alone showed in a small step)
            hp = _scheduled(config, hp, step, lr_scale, lr_of, scheduled)
        t = steps[i] if partial else step
        try:
            if guard is not None:  # (only an update in place has one, and only a bounded kernel runs in place)
                finite &= algorithm.fused(param, grad, state, hp, t, read, guard=guard, out=into) == 0
            elif fused:
                finite &= algorithm.fused(param, grad, state, hp, t, read) == 0
            else:
                finite &= reference(algorithm.update, param, grad, state, hp, t, read) == 0
        except ArithmeticError:  # Python scalar math that overflowed (a huge power): a non-finite step
            finite = False
    return grad_norm, finite


def _scheduled(config: TrainingConfig, hp, step: int, lr_scale: float, lr_of: dict[int, float] | None,
               scheduled: dict[int, Any]):
    """``hp`` as step ``step`` uses it: its lr scheduled, scaled, or set by a stateful schedule (each
    group's made once per step, in ``scheduled``)."""
    if config.schedule is None and lr_scale == 1.0:
        return hp
    if id(hp) not in scheduled:
        if lr_of is not None:
            update = {"lr": lr_of[id(hp)] * lr_scale}
        elif config.schedule is not None:
            update = config.schedule.overrides(hp, step - 1, lr_scale)
        else:
            update = {"lr": hp.lr * lr_scale}
        scheduled[id(hp)] = hp.model_copy(update=update)
    return scheduled[id(hp)]


def bound_step(config: TrainingConfig, hyperparameters: list[Any], top: Top | None, grad_max: float, step: int,
               dtype, lr_scale: float = 1.0, lr_of: dict[int, float] | None = None) -> Top | None:
    """The session's maxima after step ``step`` (every tensor at that step, none skipped) when the
    update provably writes only finite values, given ``top`` before it and max|g| (clipping only
    scales the gradients down): then it may run in place. None when unproven, or when the update
    has no bound. (The bounds are the kernels': the caller runs the step fused.)"""
    algorithm = config.algorithm
    if algorithm.bound is None or top is None or not math.isfinite(grad_max):
        return None
    scheduled: dict[int, Any] = {}
    bounds = []
    try:
        for hp in {id(hp): hp for hp in hyperparameters}.values():
            bounds.append(algorithm.bound(_scheduled(config, hp, step, lr_scale, lr_of, scheduled), step, top,
                                          grad_max, dtype))
    except (Unproven, ArithmeticError):  # ArithmeticError: the scalars' own math overflowed (β^t, say)
        return None
    return Top(max(b.param for b in bounds), top.state._make(
        None if values[0] is None else max(values) for values in zip(*(b.state for b in bounds))))


def measure(algorithm, params: Sequence[np.ndarray], states: Sequence[tuple]) -> Top:
    """The maxima ``bound_step`` starts from, measured: max|x| of the parameters and of each buffer
    over every tensor (inf where one is non-finite)."""
    fields = [None if all(s[k] is None for s in states) else max(max_abs(s[k]) for s in states if s[k] is not None)
              for k in range(len(algorithm.state_type._fields))]
    return Top(max((max_abs(p) for p in params), default=0.0), algorithm.state_type(*fields))


def warm_kernels() -> None:
    """Compile (or load from numba's cache) every kernel the registry names (``Optimizer.warm``) for
    both dtypes now, not on a first request. An update in place compiles what a step runs: every
    array a kernel only reads goes in read-only (``flat_read``, in ``kernels.apply``), whether or not it is
    the array written."""
    for dtype in (np.float32, np.float64):
        for name, algorithm in OPTIMIZERS.items():
            for variant in algorithm.warm:
                for size in (1, PARALLEL_MIN_ELEMENTS):  # the serial and the parallel build
                    config = TrainingConfig.model_validate({"optimizer": {"type": name, **variant}})
                    param = np.zeros(size, dtype)
                    state = algorithm.init(param, config.optimizer)
                    algorithm.fused(param, np.zeros(size, dtype), state, config.optimizer, 1)
        for size in (1, PARALLEL_MIN_ELEMENTS):  # what an update in place measures the state with
            max_abs(np.zeros(size, dtype))


def warm_team() -> None:
    """Start the calling thread's OpenMP team now (a thread's first parallel kernel does), then give the
    thread back the CPUs it had. Bound (``OMP_PROC_BIND``, which ``optim-service serve`` sets), libgomp
    pins a team's primary thread to one core for good: right for the kernel thread, whose worker it
    keeps off that core, but not for the event loop, which runs the steps too small to hand over."""
    cpus = os.sched_getaffinity(0)
    max_abs(np.zeros(PARALLEL_MIN_ELEMENTS, np.float32))
    os.sched_setaffinity(0, cpus)
