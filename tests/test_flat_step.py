"""A session whose tensors share their hyperparameters steps as one flat array per kind (record schema
2): the same bits as a step tensor by tensor. Version 1 records still load, and are rewritten as 2."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from optim_service.optim.base import Run, joined
from optim_service.optim.config import TrainingConfig, apply_step
from optim_service.record import SCHEMA_VERSION, Layout, Session, from_record, read_meta
from optim_service.sessions import SessionService
from optim_service.settings import Settings
from optim_service.store import MemoryStore, SessionRecord

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "e": (0,), "v": (7,)}
OPTIMIZERS = [
    {"type": "sgd", "lr": 0.1},
    {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"type": "adagrad", "lr": 0.1, "lr_decay": 0.01},
    {"type": "rmsprop", "lr": 0.01, "maximize": True},
    {"type": "rmsprop", "lr": 0.01, "momentum": 0.5},
    {"type": "adam", "lr": 0.01, "weight_decay": 0.1},
    {"type": "adam", "lr": 0.01, "amsgrad": True},
    {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
]


def _session(optimizer: dict, dtype: str, extra: dict | None = None) -> Session:
    """A stored-and-reloaded session, as a step sees it (so it has slots, and ``flat``)."""
    config = TrainingConfig.model_validate({"optimizer": optimizer, **(extra or {})})
    rng = np.random.default_rng(0)
    params = [rng.normal(size=shape).astype(dtype) for shape in SHAPES.values()]
    layout = Layout(tuple(SHAPES), tuple(SHAPES.values()), dtype, "object")
    hps = config.hyperparameters_for(list(layout.names))
    states = [config.algorithm.init(p, hp) for p, hp in zip(params, hps)]
    fresh = Session("s", None, config, layout, 0, params, states)
    return from_record(fresh.to_record(), private=False)


def _run(template: Session, flat: bool, fused: bool, steps: int = 3) -> bytes:
    session = template.fork()
    rng = np.random.default_rng(1)
    for step in range(1, steps + 1):
        grads = [rng.normal(size=p.shape).astype(p.dtype) for p in session.params]
        _, finite = apply_step(session.config, session.hyperparameters, session.params, grads, session.states,
                               step, fused, session.flat() if flat else None)
        assert finite
    return bytes(session.buffer)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_one_flat_update_gives_the_bits_of_one_update_per_tensor(optimizer, dtype, fused):
    template = _session(optimizer, dtype)
    assert template.flat() is not None
    assert _run(template, flat=True, fused=fused) == _run(template, flat=False, fused=fused)


@pytest.mark.parametrize("extra", [
    {"clip_grad_norm": {"max_norm": 0.5}},
    {"clip_grad_norm": {"max_norm": 0.5, "norm_type": "inf"}, "schedule": {"type": "inverse_sqrt"}},
    {"param_groups": [{"params": ["b", "s"], "lr": 0.5}]},  # two sets of hyperparameters: per tensor
], ids=["clip", "clip-inf-schedule", "groups"])
def test_clipping_schedules_and_groups_agree_too(extra):
    template = _session({"type": "adam", "lr": 0.01}, "float32", extra)
    assert _run(template, flat=True, fused=True) == _run(template, flat=False, fused=True)


def test_the_flat_arrays_are_the_session_arrays():
    session = _session({"type": "adam"}, "float32").fork()
    params, state = session.flat()
    params[:] = 2.0
    state.exp_avg_sq[:] = 3.0
    assert all((p == 2.0).all() for p in session.params)
    assert all((s.exp_avg_sq == 3.0).all() and (s.exp_avg == 0.0).all() for s in session.states)


def test_uneven_buffers_have_no_flat_form():
    """momentum in one group only: tensors hold different buffers, so the kinds are not single runs."""
    template = _session({"type": "sgd", "lr": 0.1}, "float32",
                        {"param_groups": [{"params": ["w"], "momentum": 0.9}]})
    assert template.flat() is None
    assert _run(template, flat=True, fused=True) == _run(template, flat=False, fused=True)


def _version_1(session: Session) -> SessionRecord:
    """The record an earlier release wrote: each tensor's buffers right after the parameters, together."""
    meta = orjson.loads(orjson.dumps(session.meta()))
    meta["schema_version"] = 1
    chunks = [*session.params, *(b for i in range(len(session.params)) for b in session.buffers(i).values())]
    data = b"".join(np.ascontiguousarray(c).tobytes() for c in chunks)
    return SessionRecord(session.id, session.owner, session.version, orjson.dumps(meta), data)


async def test_a_version_1_record_steps_like_a_current_one_and_is_rewritten_as_current():
    current = _session({"type": "adam", "lr": 0.01, "amsgrad": True}, "float32").fork()
    rng = np.random.default_rng(2)
    for p in current.params:  # non-trivial state to carry across
        p += 1.0
    for state in current.states:
        state.exp_avg[...] = rng.normal(size=state.exp_avg.shape)
        state.exp_avg_sq[...] = rng.random(size=state.exp_avg_sq.shape)
    old = _version_1(current)
    loaded = from_record(old)
    for a, b in zip([*loaded.params, *(x for s in loaded.states for x in s)],
                    [*current.params, *(x for s in current.states for x in s)]):
        np.testing.assert_array_equal(a, b)

    grads = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    results = []
    for record in (old, current.to_record()):
        store = MemoryStore()
        await store.create(record)
        service = SessionService(store, Settings(store="memory"))
        await service.step(None, record.id, lambda s: [grads[n] for n in s.layout.names])
        stored = await store.get(record.id)
        assert read_meta(stored)["schema_version"] == SCHEMA_VERSION
        results.append(bytes(stored.data))
    assert results[0] == results[1]


def test_small_tensors_sharing_hyperparameters_are_updated_through_the_flat_arrays():
    template = _session({"type": "adam", "lr": 0.01}, "float32")
    own, other = template.fork(), template.fork()
    grads = [np.ones(p.shape, np.float32) for p in own.params]
    apply_step(own.config, own.hyperparameters, own.params, grads, own.states, 1, True, other.flat())
    assert bytes(own.buffer) == bytes(template.buffer)  # untouched: the one update went to `other`
    assert bytes(other.buffer) != bytes(template.buffer)


def test_large_tensors_are_updated_one_by_one():
    """Above 16,384 elements a tensor on average, joining the gradients would cost more than the calls."""
    from optim_service.optim.config import FLAT_MAX_AVERAGE

    config = TrainingConfig.model_validate({"optimizer": {"type": "sgd", "lr": 1.0}})
    params = [np.zeros(FLAT_MAX_AVERAGE + 1, np.float32) for _ in range(2)]
    states = [config.algorithm.init(p, config.optimizer) for p in params]
    layout = Layout(("a", "b"), tuple(p.shape for p in params), "float32", "object")
    template = from_record(Session("s", None, config, layout, 0, params, states).to_record(), private=False)
    own, other = template.fork(), template.fork()
    grads = [np.ones(p.shape, np.float32) for p in own.params]
    apply_step(own.config, own.hyperparameters, own.params, grads, own.states, 1, True, other.flat())
    assert all((p == -1.0).all() for p in own.params) and bytes(other.buffer) == bytes(template.buffer)


VARIANTS = [*OPTIMIZERS, {"type": "rmsprop", "centered": True}, {"type": "adam", "betas": [0.4, 0.9]}]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
@pytest.mark.parametrize("flat", [True, False], ids=["one-update", "per-tensor"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_step_into_fresh_memory_writes_every_element_as_in_place_would(optimizer, dtype, flat, fused):
    """The step path forks without copying and reads the stored, read-only record: every byte of
    the fork is written (it starts as NaN here), and the bits are those of an update in place."""
    template = _session(optimizer, dtype)
    assert not template.params[0].flags.writeable
    in_place, fresh = template.fork(), template.fork(copy=False)
    fresh.buffer[...] = np.frombuffer(np.full(len(fresh.buffer) // 8 + 1, np.nan).tobytes(), np.uint8)[:len(fresh.buffer)]
    rng = np.random.default_rng(4)
    grads = [rng.normal(size=p.shape).astype(dtype) for p in template.params]
    for session, source in ((in_place, None), (fresh, template.source())):
        _, finite = apply_step(session.config, session.hyperparameters, session.params, grads, session.states, 1,
                               fused, session.flat() if flat else None, source)
        assert finite
    assert bytes(fresh.buffer) == bytes(in_place.buffer)
    assert bytes(template.buffer) == bytes(_session(optimizer, dtype).buffer)  # the record is untouched


@pytest.mark.parametrize("optimizer,extra", [
    ({"type": "sgd", "lr": 0.1}, {"param_groups": [{"params": ["w", "v"], "momentum": 0.9}]}),  # uneven buffers
    ({"type": "adam", "lr": 0.01}, {"param_groups": [{"params": ["b"], "amsgrad": True, "lr": 0.1}],
                                    "clip_grad_norm": {"max_norm": 0.1}, "schedule": {"type": "inverse_sqrt"}}),
], ids=["sgd-momentum-in-one-group", "adam-amsgrad-in-one-group-clipped"])
def test_a_step_into_fresh_memory_with_groups_matches_in_place(optimizer, extra):
    template = _session(optimizer, "float32", extra)
    in_place, fresh = template.fork(), template.fork(copy=False)
    fresh.buffer[...] = 255  # NaN bytes: anything left unwritten shows
    grads = [np.full(p.shape, 0.3, np.float32) for p in template.params]
    for session, source in ((in_place, None), (fresh, template.source())):
        _, finite = apply_step(session.config, session.hyperparameters, session.params, grads,
                               session.states, 1, True, session.flat(), source)
        assert finite
    assert bytes(fresh.buffer) == bytes(in_place.buffer)


async def test_a_flat_step_lays_no_per_tensor_arrays_and_leaves_the_state_read_only():
    """A step over the whole session needs one array per kind: the per-tensor views (300 for 100
    Adam tensors) are laid only when something reads them, and what is stored is frozen."""
    template = _session({"type": "adam", "lr": 0.01}, "float32")
    store = MemoryStore()
    await store.create(template.to_record())
    service = SessionService(store, Settings(store="memory", in_place=False))
    grads = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    stepped = (await service.step(None, "s", lambda s: [grads[n] for n in s.layout.names])).session
    assert stepped.arrays.laid() == []
    flat_params, flat_state = stepped.flat()
    for array in (stepped.buffer, flat_params, *flat_state):
        assert array is None or not array.flags.writeable
    w = stepped.params[0]  # laid now, from the stored memory, read-only as well
    assert w.shape == SHAPES["w"] and not w.flags.writeable and np.shares_memory(w, stepped.buffer)
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    # and the next step reads it as it is
    again = (await service.step(None, "s", lambda s: [grads[n] for n in s.layout.names])).session
    assert again.step == 2 and not np.shares_memory(again.buffer, stepped.buffer)


def test_a_run_cuts_its_pieces_only_when_read_and_joins_without_a_copy():
    whole = np.arange(1 + 6 + 4, dtype=np.float32)
    run = Run(whole, ((), (2, 3), (4,)))
    assert len(run) == 3 and joined(run) is whole
    pieces = list(run)
    assert [p.shape for p in pieces] == [(), (2, 3), (4,)]
    assert all(np.shares_memory(p, whole) for p in pieces[1:])
    np.testing.assert_array_equal(np.concatenate([p.reshape(-1) for p in pieces]), whole)
    listed = [np.ones(2), np.zeros((1, 3))]
    np.testing.assert_array_equal(joined(listed), [1, 1, 0, 0, 0])
