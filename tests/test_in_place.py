"""Updates in place (#20, decision 2): each optimizer's ``bound`` admits an update only when it
provably writes no non-finite value, and where it admits one, the update in place gives the same
bits as the update out of place; the service then steps a session's own memory, never one a
reader still holds."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from optim_service.optim.config import TrainingConfig, apply_step, bound_step, measure

VARIANTS = [
    ("adam", {}), ("adam", {"amsgrad": True}), ("adam", {"maximize": True, "weight_decay": 0.1}),
    ("adamw", {}), ("adamw", {"amsgrad": True, "weight_decay": 0.5}),
    ("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.5, "dampening": 0.3, "maximize": True}),
    ("adagrad", {}), ("adagrad", {"lr_decay": 0.01, "weight_decay": 0.1}),
    ("rmsprop", {}), ("rmsprop", {"momentum": 0.9}), ("rmsprop", {"square_avg_init": "first_grad"}),
]
NONNEGATIVE = {"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg"}


def _config(kind: str, variant: dict, lr: float, eps: float | None, **extra) -> TrainingConfig:
    optimizer = {"type": kind, **variant, "lr": lr}
    if eps is not None and kind != "sgd":
        optimizer["eps"] = eps
    return TrainingConfig.model_validate({"optimizer": optimizer, **extra})


def _magnitudes(draw, n: int, top: int) -> np.ndarray:
    """Values of every scale up to 10^top, zeros among them: where overflow lives."""
    mantissa = np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
    exponent = np.array(draw(st.lists(st.integers(-40, top), min_size=n, max_size=n)))
    return mantissa * 10.0 ** exponent


def _arrays(cfg: TrainingConfig, draw, n: int, dtype, top: int):
    hp = cfg.hyperparameters_for(["w"])[0]
    param = np.zeros(n, dtype)
    state = cfg.algorithm.init(param, hp)
    with np.errstate(over="ignore"):
        param[...] = _magnitudes(draw, n, top)
        for name, buffer in zip(state._fields, state):
            if buffer is not None:
                values = _magnitudes(draw, n, top)
                buffer[...] = np.abs(values) if name in NONNEGATIVE else values
    return param, state


def _assert_within(cfg: TrainingConfig, param, state, after) -> None:
    """Every value the update wrote is within the maxima its bound gave."""
    now = measure(cfg.algorithm, [param], [state])
    assert now.param <= after.param
    for field, value in zip(state._fields, now.state):
        if value is not None:
            assert value <= getattr(after.state, field), field


def _bits(arrays) -> list[bytes]:
    return [a.tobytes() for a in arrays if a is not None]


@pytest.mark.parametrize("kind,variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_where_the_bound_admits_an_update_in_place_it_is_the_same_bits_and_finite(kind, variant, dtype, data):
    draw = data.draw
    top_exponent = 38 if dtype is np.float32 else 300
    lr = draw(st.sampled_from([1e-3, 1e-1, 10.0, 1e20, 1e38, 1e300]))
    eps = draw(st.sampled_from([None, 1e-8, 1e-30, 1e-45, 0.0]))
    step = draw(st.integers(1, 10**6))
    cfg = _config(kind, variant, lr, eps)
    n = draw(st.integers(1, 40))
    param, state = _arrays(cfg, draw, n, dtype, top_exponent)
    grad = _magnitudes(draw, n, top_exponent).astype(dtype)
    if draw(st.booleans()):
        grad[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if not (np.isfinite(param).all() and all(np.isfinite(b).all() for b in state if b is not None)):
        return  # a stored state is always finite (a step that would make it otherwise is refused)
    hps = cfg.hyperparameters_for(["w"])
    top = measure(cfg.algorithm, [param], [state])
    from optim_service.optim.kernels import max_abs
    after = bound_step(cfg, hps, top, max_abs(grad), step, dtype)

    out_param, out_state = np.empty_like(param), cfg.algorithm.state_type(*(
        None if b is None else np.empty_like(b) for b in state))
    _, finite_out = apply_step(cfg, hps, [out_param], [grad], [out_state], step, source=([param], [state], None))
    if after is None:
        return
    assert finite_out, "the bound admitted an update that wrote a non-finite value"
    _, finite_in = apply_step(cfg, hps, [param], [grad], [state], step)  # in place
    assert finite_in
    assert _bits([param, *state]) == _bits([out_param, *out_state])
    _assert_within(cfg, param, state, after)


@pytest.mark.parametrize("kind,variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_guarded_update_in_place_takes_gradients_changed_past_the_proof_as_0(kind, variant, dtype, data):
    """A shared-memory step's gradients lie in the client's memory: it may change them between the
    pass that measures max|g| for the proof and the update. Guarded at that max|g|, the update in
    place is the update of what it read with every value past it (NaN and ±Inf too) taken as 0:
    the same bits as that update out of place, finite, within the bound, and its new parameters
    written to ``out`` as well."""
    from optim_service.optim.kernels import max_abs

    draw = data.draw
    top_exponent = 38 if dtype is np.float32 else 300
    cfg = _config(kind, variant, draw(st.sampled_from([1e-3, 1e-1, 10.0, 1e20])),
                  draw(st.sampled_from([None, 1e-8, 1e-30])))
    step, n = draw(st.integers(1, 10**6)), draw(st.integers(1, 40))
    param, state = _arrays(cfg, draw, n, dtype, top_exponent)
    if not (np.isfinite(param).all() and all(np.isfinite(b).all() for b in state if b is not None)):
        return
    measured = _magnitudes(draw, n, top_exponent).astype(dtype)
    grad_max = max_abs(measured)
    hps = cfg.hyperparameters_for(["w"])
    after = bound_step(cfg, hps, measure(cfg.algorithm, [param], [state]), grad_max, step, dtype)
    if after is None:
        return
    read = measured.copy()  # what the update reads: some values changed since the measure
    past = float(np.finfo(dtype).max)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=n)):
        read[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, past, -past, 2.0 * grad_max + 1, -grad_max,
                                        grad_max / 3]))
    with np.errstate(invalid="ignore"):
        taken = np.where(np.abs(read) <= grad_max, read, 0).astype(dtype)
    out_param, out_state = np.empty_like(param), cfg.algorithm.state_type(*(
        None if b is None else np.empty_like(b) for b in state))
    _, finite_out = apply_step(cfg, hps, [out_param], [taken], [out_state], step, source=([param], [state], None))
    answer = np.full(n, np.nan, dtype)
    _, finite_in = apply_step(cfg, hps, [param], [read], [state], step, guard=(grad_max, 0.0), out=answer)
    assert finite_out and finite_in
    assert _bits([param, *state]) == _bits([out_param, *out_state])
    assert answer.tobytes() == param.tobytes()
    _assert_within(cfg, param, state, after)


@pytest.mark.parametrize("kind,variant", VARIANTS)
def test_an_update_in_place_writes_each_tensors_parameters_into_its_run_of_out(kind, variant):
    """Tensor by tensor (different hyperparameters per tensor, so no single flat update), each
    tensor's new parameters go to its own run of ``out``, in creation order; unguarded, the values
    are the update's as ever."""
    from optim_service.optim.kernels import UNGUARDED

    cfg = _config(kind, variant, 1e-2, None)
    hps = cfg.hyperparameters_for(["a", "b"])
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
    states = [cfg.algorithm.init(p, hp) for p, hp in zip(params, hps)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    copies = [p.copy() for p in params], [s._make(None if b is None else b.copy() for b in s) for s in states]
    apply_step(cfg, hps, copies[0], grads, copies[1], 3)
    out = np.full(11, np.nan, np.float32)
    apply_step(cfg, hps, params, grads, states, 3, guard=UNGUARDED, out=out)
    assert out.tobytes() == b"".join(p.tobytes() for p in params) == b"".join(p.tobytes() for p in copies[0])


@pytest.mark.parametrize("kind,variant", VARIANTS)
def test_the_bound_admits_a_real_run_carried_from_step_to_step(kind, variant):
    """A real run (unit gradients, the usual lr): every step of 2,000 is admitted, on the maxima the
    previous bound carried or, where those grew past what proves the next step, measured again (as
    the service does). Adam's bound is loose (|m|/(√v̂ + ε) ≤ |m|/ε), so coupled weight decay feeds
    the parameters' bound back into the gradient's and it measures every few steps; nothing else
    measures at all. The state stays under the carried maxima."""
    rng = np.random.default_rng(0)
    cfg = _config(kind, variant, 1e-2 if kind in ("sgd", "adagrad") else 1e-3, None)
    hps = cfg.hyperparameters_for(["w"])
    param = rng.standard_normal(1000).astype(np.float32)
    state = cfg.algorithm.init(param, hps[0])
    top, measured = measure(cfg.algorithm, [param], [state]), 0
    for step in range(1, 2001):
        grad = rng.standard_normal(1000).astype(np.float32)
        after = bound_step(cfg, hps, top, float(np.abs(grad).max()), step, np.float32)
        if after is None:
            measured += 1
            after = bound_step(cfg, hps, measure(cfg.algorithm, [param], [state]), float(np.abs(grad).max()),
                               step, np.float32)
        assert after is not None, f"step {step} unproven on measured maxima"
        top = after
        _, finite = apply_step(cfg, hps, [param], [grad], [state], step)
        assert finite
        now = measure(cfg.algorithm, [param], [state])
        assert now.param <= top.param and all(m is None or m <= t for m, t in zip(now.state, top.state))
    coupled_adam = kind == "adam" and variant.get("weight_decay")
    assert measured <= (2000 // 3 if coupled_adam else 0), measured


@pytest.mark.parametrize("variant,why", [
    ({"type": "adam", "eps": 0.0}, "a zero ε leaves 0/0 possible"),
    ({"type": "adam", "eps": 1e-46}, "ε rounds to 0 in float32"),
    ({"type": "adam", "betas": [0.4, 0.999]}, "torch's other lerp: the numpy reference"),
    ({"type": "rmsprop", "centered": True}, "√(σ² − ḡ²) may round below 0"),
    ({"type": "lion"}, "no bound"),
])
def test_unproven_updates_go_out_of_place(variant, why):
    cfg = TrainingConfig.model_validate({"optimizer": variant})
    hps = cfg.hyperparameters_for(["w"])
    param = np.ones(4, np.float32)
    top = measure(cfg.algorithm, [param], [cfg.algorithm.init(param, hps[0])])
    assert bound_step(cfg, hps, top, 1.0, 1, np.float32) is None, why


def test_a_huge_or_non_finite_gradient_is_unproven():
    cfg = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    hps = cfg.hyperparameters_for(["w"])
    param = np.ones(4, np.float32)
    top = measure(cfg.algorithm, [param], [cfg.algorithm.init(param, hps[0])])
    assert bound_step(cfg, hps, top, 1.0, 1, np.float32) is not None
    assert bound_step(cfg, hps, top, 1e30, 1, np.float32) is None  # g² overflows float32
    assert bound_step(cfg, hps, top, float("inf"), 1, np.float32) is None
    assert bound_step(cfg, hps, top, float("nan"), 1, np.float32) is None


# -- the service: when a step goes in place, and that nobody sees it happen ---------------------------

import asyncio  # noqa: E402

from optim_service.api.codecs.octet_stream import decode_binary  # noqa: E402
from optim_service.record import Layout  # noqa: E402
from optim_service.sessions import SessionService  # noqa: E402
from optim_service.settings import Settings  # noqa: E402
from optim_service.store.memory import MemoryStore  # noqa: E402


def _service(**settings) -> SessionService:
    return SessionService(MemoryStore(), Settings(**{"in_place_min_bytes": 0, **settings}))


async def _created(service: SessionService, optimizer: dict, sizes=(3000, 500), **config):
    cfg = TrainingConfig.model_validate({"optimizer": optimizer, **config})
    names = tuple(f"t{i}" for i in range(len(sizes)))
    layout = Layout(names, tuple((n,) for n in sizes), "float32", "dict")
    rng = np.random.default_rng(1)
    return await service.create(None, cfg, layout, [rng.standard_normal(n).astype(np.float32) for n in sizes])


def _binary(grad: np.ndarray):
    body = grad.tobytes()
    return lambda session: decode_binary(body, session.layout)


async def _stepped(service: SessionService, steps: int, sizes=(3000, 500)):
    """An Adam session of ``service`` that has taken ``steps`` steps of ones (every one after the
    first in place), and that gradient; no result is kept, so none holds the session's memory."""
    session = await _created(service, {"type": "adam"}, sizes=sizes)
    grad = _binary(np.ones(sum(sizes), np.float32))
    for _ in range(steps):
        await service.step(None, session.id, grad)
    return session, grad


async def _run(service: SessionService, optimizer: dict, steps: int, **config):
    session = await _created(service, optimizer, **config)
    rng = np.random.default_rng(2)
    in_place = []
    for _ in range(steps):
        result = await service.step(None, session.id, _binary(rng.standard_normal(3500).astype(np.float32)),
                                    loss=float(rng.random()))
        in_place.append(result.in_place)
    record = await service.store.get(session.id, None)
    lines = [line[:8] + line[32:] for line in await service.store.get_history(session.id)]  # less the time
    return bytes(record.data), lines, in_place


@pytest.mark.parametrize("optimizer", [
    {"type": "adam"}, {"type": "adamw", "amsgrad": True}, {"type": "sgd", "momentum": 0.9, "nesterov": True},
    {"type": "adagrad", "lr_decay": 0.01}, {"type": "rmsprop", "momentum": 0.5}, {"type": "adam", "weight_decay": 0.1},
])
@pytest.mark.parametrize("offload", [0, 1 << 30])  # on the kernel thread, or on the event loop
def test_steps_in_place_store_what_steps_out_of_place_store(optimizer, offload):
    """Every step after the first goes in place (the first reads the record as created, not memory
    of its own), and the state and history come out as without in-place updates."""
    async def both():
        return (await _run(_service(in_place=False, thread_offload_elements=offload), optimizer, 12),
                await _run(_service(thread_offload_elements=offload), optimizer, 12))
    (out_data, out_lines, out_flags), (in_data, in_lines, in_flags) = asyncio.run(both())
    assert not any(out_flags)
    assert in_flags[0] is False and all(in_flags[1:]), in_flags
    assert in_data == out_data
    assert in_lines == out_lines


def test_an_answer_still_being_sent_keeps_the_next_step_out_of_place():
    """A binary answer is a view of the session's memory until it is sent: the next step must not
    write that memory meanwhile, and goes out of place; once the view is gone, in place again."""
    async def scenario():
        service = _service()
        session, grad = await _stepped(service, 2)
        answer = await service.step(None, session.id, grad)
        assert answer.in_place
        sending = answer.session.params_bytes()  # what the octet-stream codec answers with
        sent = bytes(sending)
        held = await service.step(None, session.id, grad)
        assert not held.in_place and bytes(sending) == sent
        del sending, answer
        answer = await service.step(None, session.id, grad)  # on the maxima measured again
        assert answer.in_place
        view = answer.session.params[1]  # a reader's hold on one of the session's own views
        seen = view.copy()
        assert not (await service.step(None, session.id, grad)).in_place
        np.testing.assert_array_equal(view, seen)
    asyncio.run(scenario())


@pytest.mark.parametrize("config,settings", [
    ({"rollback_snapshots": 2}, {}),  # a snapshot is the old record itself
    ({}, {"in_place_min_bytes": 1 << 20}),  # small: the proof would cost more than it saves
    ({}, {"fused_kernels": False}),
    ({}, {"in_place": False}),
])
def test_what_keeps_every_step_out_of_place(config, settings):
    async def scenario():
        service = _service(**settings)
        session = await _created(service, {"type": "adam"}, **config)
        return [(await service.step(None, session.id, _binary(np.ones(3500, np.float32)))).in_place
                for _ in range(5)]
    assert not any(asyncio.run(scenario()))


def test_an_unproven_step_goes_out_of_place_and_is_refused_as_ever():
    """A gradient whose square overflows float32 is no proof: out of place, refused, nothing changed;
    the session then goes on in place."""
    async def scenario():
        service = _service()
        session, grad = await _stepped(service, 3)
        before = bytes((await service.store.get(session.id, None)).data)
        with pytest.raises(Exception, match="non-finite"):
            await service.step(None, session.id, _binary(np.full(3500, 1e30, np.float32)))
        assert bytes((await service.store.get(session.id, None)).data) == before
        flags = []
        for _ in range(3):
            result = await service.step(None, session.id, grad)
            flags.append(result.in_place)
        assert flags == [True] * 3 and result.session.step == 6
    asyncio.run(scenario())


def test_a_reader_during_an_update_in_place_sees_one_step_whole():
    """A large update runs on the kernel thread while the event loop serves others: a reader then
    waits for the step to commit, and never sees its memory half-written, or step N's number with
    step N + 1's values."""
    async def scenario():
        service = _service(thread_offload_elements=0)
        session = await _created(service, {"type": "adam"}, sizes=(1 << 20,))
        grad = _binary(np.ones(1 << 20, np.float32))
        states = {}
        for _ in range(3):
            result = await service.step(None, session.id, grad)
            states[result.session.step] = bytes(result.session.params_bytes())
        for _ in range(3):
            step, seen = asyncio.ensure_future(service.step(None, session.id, grad)), []
            while not step.done():  # readers all along the step, the update on the kernel thread
                seen.append(await service.load(None, session.id))
                await asyncio.sleep(0)
            result = await step
            assert result.in_place
            states[result.session.step] = bytes(result.session.params_bytes())
            for reader in seen:
                assert bytes(reader.params_bytes()) == states[reader.step]
    asyncio.run(scenario())


def test_a_step_in_place_cancelled_midway_still_commits():
    """Its memory is the stored record's: once the update starts, the step runs to its commit, even
    if the request that made it is cancelled (a client gone)."""
    async def scenario():
        service = _service(thread_offload_elements=0)
        session, grad = await _stepped(service, 3, sizes=(1 << 20,))
        step = asyncio.ensure_future(service.step(None, session.id, grad))
        await asyncio.sleep(0)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        seen = await service.load(None, session.id)  # waits for the update to commit
        assert seen.step == 4
        check = _service(in_place=False)
        twin = await _created(check, {"type": "adam"}, sizes=(1 << 20,))
        for _ in range(4):
            last = await check.step(None, twin.id, grad)
        assert bytes(seen.params_bytes()) == bytes(last.session.params_bytes())
    asyncio.run(scenario())


# -- through a real server ------------------------------------------------------------------------

from optim_service import history  # noqa: E402
from optim_service.optim.kernels import max_abs  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_history_pass_takes_max_g_beside_the_norm(dtype, data):
    """max|g| rides on the pass a binary step's line makes for the gradient norm: the same norm as
    ever up to the order of its sum (both passes may reassociate it, ``history.SUMS``: a sum of n
    squares in any order is within (n - 1) ulps), and max|x| exactly, inf for a NaN or ±Inf anywhere."""
    n = data.draw(st.integers(0, 300))
    width = 32 if dtype is np.float32 else 64
    values = np.array(data.draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=width),
                                         min_size=n, max_size=n)), dtype)
    grads = [values[: n // 2], None, values[n // 2:]]
    norm, top = history.grad_norm_and_max(grads)
    assert top == max_abs(values)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = history.grad_norm(grads)
    assert (math.isclose(norm, expected, rel_tol=max(n, 1) * sys.float_info.epsilon)
            or (math.isnan(norm) and math.isnan(expected)))


def test_a_served_binary_step_goes_in_place(tmp_path):
    """Through a real server: binary steps go in place (the history's pass took max|g|), their answers are
    torch's (to float32 parity: torch's vectorised lerp fuses a multiply-add), and two clients stepping one session with answers in flight never get a
    torn answer (each is one step's params, the same as the other client's for that step)."""
    import threading

    import httpx
    import torch

    from conftest import ServerProcess

    server = ServerProcess("--store", "memory", env={"OPTIM_THREAD_OFFLOAD_ELEMENTS": "0",
                                                      "OPTIM_IN_PLACE_MIN_BYTES": "0"})
    try:
        n = 1 << 18
        with httpx.Client(base_url=server.url, timeout=60) as http:
            created = http.post("/v1/sessions", json={"params": {"w": [0.0] * n}, "optimizer": {"type": "adam"},
                                                      "dtype": "float32"})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            rng = np.random.default_rng(3)
            param = torch.zeros(n, requires_grad=True)
            opt = torch.optim.Adam([param])
            binary = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
            for _ in range(4):
                g = rng.standard_normal(n).astype(np.float32)
                answer = http.post(f"/v1/sessions/{sid}/step", content=g.tobytes(), headers=binary)
                param.grad = torch.from_numpy(g)
                opt.step()
                np.testing.assert_allclose(np.frombuffer(answer.content, np.float32), param.detach().numpy(),
                                           rtol=1e-5, atol=1e-6)
            metrics = http.get("/metrics").text
            counted = [line for line in metrics.splitlines() if line.startswith("optim_updates_in_place_total")]
            assert float(counted[0].split()[-1]) >= 3

            answers: dict[int, list[bytes]] = {}
            ones = np.ones(n, np.float32).tobytes()

            def worker():
                with httpx.Client(base_url=server.url, timeout=60) as own:
                    for _ in range(15):
                        r = own.post(f"/v1/sessions/{sid}/step", content=ones, headers=binary)
                        answers.setdefault(int(r.headers["etag"].strip('"')), []).append(r.content)
            threads = [threading.Thread(target=worker) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert sorted(answers) == list(range(5, 35))  # every step once: none lost, none doubled
        for step in range(5, 35):
            param.grad = torch.ones(n)
            opt.step()
            (body,) = answers[step]
            np.testing.assert_allclose(np.frombuffer(body, np.float32), param.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}")
    finally:
        server.stop()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(optimizer=st.sampled_from([o for _, o in [
           ("adam", {"type": "adam"}), ("adamw", {"type": "adamw", "amsgrad": True}),
           ("adam wd", {"type": "adam", "weight_decay": 0.5, "eps": 1e-30}), ("sgd", {"type": "sgd", "momentum": 0.9}),
           ("adagrad", {"type": "adagrad", "eps": 1e-45}), ("rmsprop", {"type": "rmsprop", "momentum": 0.5})]]),
       steps=st.lists(st.sampled_from(["normal", "huge", "nan", "zero", "tiny", "big"]), min_size=1, max_size=8))
def test_any_run_of_steps_stores_and_refuses_the_same_in_place_or_not(optimizer, steps):
    """A run of steps, some of them refused (a NaN, a gradient whose square overflows), stores the
    same bytes and refuses the same steps with updates in place as without: a refused step changes
    nothing either way."""
    scale = {"normal": 1.0, "huge": 1e30, "zero": 0.0, "tiny": 1e-40, "big": 1e15}

    async def run(service):
        session = await _created(service, optimizer)
        rng, seen = np.random.default_rng(4), []
        for kind in steps:
            grad = rng.standard_normal(3500).astype(np.float32)
            if kind == "nan":
                grad[17] = np.nan
            else:
                with np.errstate(over="ignore"):
                    grad = (grad * np.float32(scale[kind])).astype(np.float32)
            try:
                await service.step(None, session.id, _binary(grad))
                outcome = "applied"
            except Exception as e:  # a refusal: the same one either way
                outcome = type(e).__name__
            seen.append((outcome, bytes((await service.store.get(session.id, None)).data)))
        return seen

    async def both():
        return await run(_service(in_place=False)), await run(_service())
    without, with_ = asyncio.run(both())
    assert [o for o, _ in with_] == [o for o, _ in without]
    assert all(a == b for (_, a), (_, b) in zip(with_, without))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding threads to cores needs two of them")
@pytest.mark.parametrize("bind", ["default", "false"])
def test_served_kernels_bind_their_team_only(bind):
    """``optim-service serve`` binds OpenMP's teams (unless OMP_PROC_BIND says otherwise): the
    kernel thread and its worker each keep to a core of their own, so a large update never runs both
    on one; the event loop's thread, which starts its own team for mid-sized updates, keeps every CPU."""
    import httpx

    from conftest import ServerProcess

    env = {"OMP_PROC_BIND": "false"} if bind == "false" else {}
    server = ServerProcess("--store", "memory", env=env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for n in (1 << 16, 1 << 20):  # on the event loop's team, then handed to the kernel thread's
                sid = http.post("/v1/sessions", json={"params": {"w": [0.0] * n}, "optimizer": {"type": "adam"},
                                                         "dtype": "float32"}).json()["id"]
                answer = http.post(f"/v1/sessions/{sid}/step", content=np.ones(n, np.float32).tobytes(),
                                   headers={"Content-Type": "application/octet-stream"})
                assert answer.status_code == 200, answer.text
        pid, everything = server.proc.pid, os.sched_getaffinity(0)
        threads = {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    finally:
        server.stop()
    assert threads[pid] == everything  # the event loop
    pinned = [cpus for cpus in threads.values() if len(cpus) == 1]
    if bind == "false":
        assert pinned == []
    else:  # the kernel thread on one core, its worker on another
        assert len(set().union(*pinned)) >= 2, threads


@pytest.mark.parametrize("offload", [True, False])
def test_a_large_steps_passes_run_on_the_kernel_thread(monkeypatch, offload):
    """A step large enough to leave the event loop (``thread_offload_elements``) takes its gradient
    norm and max|g| on the kernel thread too, just before its update there, so the event loop waits
    on none of its passes; a smaller step takes them where it runs."""
    import threading

    from optim_service import history

    threads, measure = [], history.grad_norm_and_max

    def watched(grads):
        threads.append(threading.current_thread().name)
        return measure(grads)

    monkeypatch.setattr(history, "grad_norm_and_max", watched)

    async def scenario():
        service = _service(thread_offload_elements=1000 if offload else 1 << 30)
        session, _ = await _stepped(service, 2)
        for _ in range(3):
            memory = service.binary_memory(None, session.id, 3500 * 4)
            assert memory is not None
            memory[:14000] = np.ones(3500, np.float32).view(np.uint8)  # a binary body read into it
            result = await service.step(None, session.id, lambda s, m=memory: decode_binary(m[:14000], s.layout),
                                        memory=memory)
            assert result.in_place
            del result
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert len(threads) == 3
    assert all(name.startswith("optim-kernels") if offload else name == loop_thread for name in threads), threads
