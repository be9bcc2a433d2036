"""Shared-memory regions (``OPTIM_SHM``): a step whose gradients lie in a registered /dev/shm region,
and whose answer goes into one, is the binary step bit for bit on every store; every bad region is
a 4xx that changes nothing; regions belong to their API key; the SDK uses them when asked and
falls back to the wire when the server refuses."""

from __future__ import annotations

import json
import os
from multiprocessing import shared_memory
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ServerProcess
from optim_service.app import create_app
from optim_service.settings import Settings

SHM = "application/vnd.optim.shm+json"
KEY_A, KEY_B = "a" * 32, "b" * 32


@pytest.fixture
def files():
    """Regions' files, unlinked at the end whatever the test did to them."""
    made: list[shared_memory.SharedMemory] = []

    def make(nbytes: int) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(create=True, size=nbytes))
        return made[-1]

    yield make
    for f in made:
        try:
            f.close()
        except BufferError:  # a failed test's traceback still holds a view of it
            pass
        try:
            f.unlink()
        except FileNotFoundError:
            pass


async def serve(tmp_path, store: str = "memory", **settings):
    url = {"memory": "memory", "sqlite": f"sqlite:///{tmp_path}/shm.db"}.get(store, store)
    app = create_app(Settings(store=url, **settings))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    return app, lifespan, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.fixture(params=["memory", "memory-offloaded", "sqlite", "redis"])
async def client(request, tmp_path):
    store, extra = request.param, {}
    if store == "redis":
        store = request.getfixturevalue("redis_url")
        redis.Redis.from_url(store).flushdb()
    if store == "memory-offloaded":  # every copy and update on the kernel thread, as a large step's
        store, extra = "memory", {"thread_offload_elements": 0}
    app, lifespan, client = await serve(tmp_path, store, shm=True, **extra)
    yield client
    await client.aclose()
    await lifespan.__aexit__(None, None, None)


async def session(client, params: np.ndarray) -> str:
    answer = await client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.05, "weight_decay": 0.01},
                                                     "dtype": "float32", "params": {"w": params[:6].reshape(2, 3).tolist(),
                                                                                    "b": params[6:].tolist()}})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


async def register(client, name: str, f: shared_memory.SharedMemory, byte_size: int, **extra):
    return await client.post("/v1/shm/regions", json={"name": name, "key": "/" + f.name, "byte_size": byte_size,
                                                      **extra}, headers=extra.pop("headers", None) or {})


async def test_a_shared_memory_step_is_the_binary_step_bit_for_bit(client, files):
    rng = np.random.default_rng(3)
    start = rng.standard_normal(9).astype(np.float32)
    wire, shared = await session(client, start), await session(client, start)
    grads_file, params_file = files(36), files(64)
    assert (await register(client, "g", grads_file, 36)).status_code == 201
    assert (await register(client, "p", params_file, 48, offset=8)).status_code == 201
    listed = (await client.get("/v1/shm/regions")).json()
    assert {r["name"] for r in listed} == {"g", "p"} and (await client.get("/v1/shm/regions/p")).json()["status"] == "ready"
    grads_view = np.frombuffer(grads_file.buf, np.float32, 9)
    for t in range(6):
        grads = rng.standard_normal(9).astype(np.float32)
        by_wire = await client.post(f"/v1/sessions/{wire}/step", content=grads.tobytes(), headers={
            "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
        grads_view[:] = grads
        body = {"gradients": {"region": "g"}, "loss": 1.0 / (t + 1)}
        if t % 2 == 0:  # the answer into a region (at an offset into it), or in the body
            body["params"] = {"region": "p", "offset": 4}
        answer = await client.post(f"/v1/sessions/{shared}/step", json=body, headers={"Content-Type": SHM})
        assert answer.status_code == 200, answer.text
        if t % 2 == 0:
            assert answer.json()["params"] == {"region": "p", "offset": 4, "byte_size": 36}
            got = np.frombuffer(params_file.buf, np.float32, 9, offset=12).tobytes()
        else:
            got = np.concatenate([np.ravel(answer.json()["params"][n]) for n in ("w", "b")]).astype(np.float32).tobytes()
        assert got == by_wire.content
    a, b = [(await client.get(f"/v1/sessions/{s}/state")).json() for s in (wire, shared)]
    assert a == b and (await client.get(f"/v1/sessions/{shared}")).json()["step"] == 6
    history = (await client.get(f"/v1/sessions/{shared}/history")).json()["history"]
    assert [h["loss"] for h in history] == [1.0 / (t + 1) for t in range(6)]


async def test_a_retried_step_is_applied_once_and_answered_again(client, files):
    sid = await session(client, np.ones(9, np.float32))
    grads_file, params_file = files(36), files(36)
    await register(client, "g", grads_file, 36)
    await register(client, "p", params_file, 36)
    np.frombuffer(grads_file.buf, np.float32)[:] = 0.5
    body = {"gradients": {"region": "g"}, "params": {"region": "p"}}
    first = await client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Content-Type": SHM,
                                                                             "Idempotency-Key": "k1"})
    after = bytes(params_file.buf[:36])
    params_file.buf[:36] = bytes(36)  # the answer lost with the client's memory, say
    again = await client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Content-Type": SHM,
                                                                             "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert bytes(params_file.buf[:36]) == after
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1


async def test_every_bad_region_is_a_4xx_that_changes_nothing(client, files, tmp_path):
    sid = await session(client, np.ones(9, np.float32))
    before = (await client.get(f"/v1/sessions/{sid}/state")).json()
    grads_file, small = files(36), files(16)
    for body, status, words in [
        ({"name": "x", "key": "../etc/passwd", "byte_size": 4}, 422, "no path"),
        ({"name": "x", "key": "/nothing-here-" + os.urandom(4).hex(), "byte_size": 4}, 422, "create it first"),
        ({"name": "x", "key": "/" + small.name, "byte_size": 17}, 422, "holds 16 bytes"),
        ({"name": "../x", "key": "/" + small.name, "byte_size": 4}, 422, "region name"),
        ({"name": "x", "key": "/" + small.name, "byte_size": 0}, 422, "byte_size"),
    ]:
        answer = await client.post("/v1/shm/regions", json=body)
        assert answer.status_code == status and words in answer.text, answer.text
    link = Path("/dev/shm") / f"link-{os.urandom(4).hex()}"
    link.symlink_to(f"/dev/shm/{small.name}")
    try:
        assert (await register(client, "x", type("F", (), {"name": link.name})(), 4)).status_code == 422
    finally:
        link.unlink()
    assert (await client.get("/v1/shm/regions")).json() == []
    await register(client, "g", grads_file, 36)
    await register(client, "small", small, 16)
    assert (await register(client, "g", grads_file, 36)).status_code == 409  # a name is registered once
    for body, status, words in [
        ({"gradients": {"region": "nope"}}, 404, "POST /v1/shm/regions"),
        ({"gradients": {"region": "small"}}, 422, "expected 36 bytes"),  # the session needs 36
        ({"gradients": {"region": "g", "offset": 4}}, 422, "expected 36 bytes"),
        ({"gradients": {"region": "g", "byte_size": 40}}, 422, "do not fit"),
        ({"gradients": {"region": "small", "offset": 24}}, 422, "past the end"),
        ({"gradients": {"region": "g"}, "params": {"region": "small"}}, 422, "do not fit"),  # before the step
        ({"gradients": {"region": "g"}, "params": {"region": "nope"}}, 404, "nope"),
        ({"gradients": {"region": "g"}, "extra": 1}, 422, "extra"),
        ({"gradients": "g"}, 422, "gradients"),
    ]:
        answer = await client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Content-Type": SHM})
        assert answer.status_code == status and words in answer.text, (body, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    os.ftruncate(os.open(f"/dev/shm/{grads_file.name}", os.O_RDWR), 8)  # the client shrinks its file
    shrunk = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"region": "g"}},
                               headers={"Content-Type": SHM})
    assert shrunk.status_code == 422 and "shrunk to 8 bytes" in shrunk.text
    assert (await client.get("/v1/shm/regions/g")).json()["status"] == "short"
    assert (await client.get(f"/v1/sessions/{sid}/state")).json() == before
    assert (await client.delete("/v1/shm/regions/g")).status_code == 204
    assert (await client.get("/v1/shm/regions/g")).status_code == 404
    assert Path(f"/dev/shm/{grads_file.name}").exists()  # unregistering leaves the client's file


async def test_regions_are_off_unless_turned_on(tmp_path, files):
    app, lifespan, client = await serve(tmp_path)
    try:
        sid = await session(client, np.ones(9, np.float32))
        for answer in (await register(client, "g", files(36), 36), await client.get("/v1/shm/regions"),
                       await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"region": "g"}},
                                         headers={"Content-Type": SHM})):
            assert answer.status_code == 403 and "OPTIM_SHM=true" in answer.json()["detail"]
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_a_key_holds_at_most_its_share_of_regions(tmp_path, files):
    app, lifespan, client = await serve(tmp_path, shm=True, shm_regions_per_key=2)
    try:
        f = files(64)
        for i in range(2):
            assert (await register(client, f"r{i}", f, 32, offset=32 * i)).status_code == 201
        over = await register(client, "r2", f, 32)
        assert over.status_code == 429 and "unregister one first" in over.json()["detail"]
        assert (await client.delete("/v1/shm/regions/r0")).status_code == 204
        assert (await register(client, "r2", f, 32)).status_code == 201
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_regions_belong_to_the_key_that_registered_them(tmp_path, files):
    app, lifespan, client = await serve(tmp_path, shm=True, api_keys=f"{KEY_A},{KEY_B}")
    a, b = ({"Authorization": f"Bearer {k}"} for k in (KEY_A, KEY_B))
    try:
        grads_file = files(36)
        made = await client.post("/v1/shm/regions", json={"name": "g", "key": "/" + grads_file.name, "byte_size": 36},
                                 headers=a)
        assert made.status_code == 201
        assert (await client.get("/v1/shm/regions", headers=b)).json() == []
        assert (await client.get("/v1/shm/regions/g", headers=b)).status_code == 404
        assert (await client.delete("/v1/shm/regions/g", headers=b)).status_code == 404
        theirs = await client.post("/v1/shm/regions", json={"name": "mine", "key": "/" + grads_file.name,
                                                            "byte_size": 36}, headers=b)
        assert theirs.status_code == 409 and "another API key" in theirs.text
        sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 0.1}, "dtype": "float32",
                                                       "params": [0.0] * 9}, headers=b)).json()["id"]
        step = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"region": "g"}},
                                 headers={**b, "Content-Type": SHM})
        assert step.status_code == 404 and (await client.get(f"/v1/sessions/{sid}", headers=b)).json()["step"] == 0
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.mark.parametrize("sealing", [True, False])
def test_the_sdk_steps_through_shared_memory_and_falls_back_to_the_wire(sealing, monkeypatch):
    """Through sealed memfds (mapped by the server) or /dev/shm files (read and written with a copy),
    the SDK's steps give the wire's bits; a server with regions off gets the wire, and says why."""
    from optim_client import OptimClient, _shm

    monkeypatch.setattr(_shm, "SEALING", sealing)
    rng = np.random.default_rng(5)
    start = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(5)]
    on, off = ServerProcess("--store", "memory", env={"OPTIM_SHM": "true"}), ServerProcess("--store", "memory")
    try:
        results = {}
        for name, url, shared in (("wire", on.url, False), ("shm", on.url, True), ("refused", off.url, True)):
            with OptimClient(url, shared_memory=shared) as client:
                s = client.create_session(start, "adamw", lr=0.01)
                for t, g in enumerate(grads):
                    out = s.step(g, loss=1.0 / (t + 1))
                results[name] = (out, client.shared_memory_refused, set(client._shm.sessions), s.step_count)
                keys = [f.key for r in client._shm.sessions.values() for f in r.files]
                if name == "shm":
                    listed = httpx.get(f"{url}/v1/shm/regions").json()
                    assert sorted(r["key"] for r in listed) == sorted(keys)
                    assert all(k.startswith("/proc/") == sealing for k in keys)
            gone = [not Path(k if k.startswith("/proc/") else f"/dev/shm{k}").exists() for k in keys]
            assert all(gone)  # closing the client closes and unlinks its files
        assert results["shm"][2] and results["shm"][1] is None and not results["refused"][2]
        assert "OPTIM_SHM" in results["refused"][1]
        for name in ("shm", "refused"):
            assert results[name][3] == 5
            for k in start:
                assert results[name][0][k].tobytes() == results["wire"][0][k].tobytes()
        assert httpx.get(f"{on.url}/v1/shm/regions").json() == []  # and unregisters them
    finally:
        on.stop()
        off.stop()


def test_gradients_in_the_shared_buffers_and_params_as_views_need_no_copies(server_with_regions):
    """``shared_buffers()`` are where a step reads its gradients: written there, they are sent as
    they lie; ``copy=False`` answers views of the params' region, updated in place by the next step
    as torch updates its parameters. The same bits as the wire."""
    from optim_client import OptimClient

    rng = np.random.default_rng(11)
    start = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    with OptimClient(server_with_regions.url) as plain, OptimClient(server_with_regions.url, shared_memory=True) as client:
        wire = plain.create_session(start, "adam", lr=0.01)
        shared = client.create_session(start, "adam", lr=0.01)
        buffer = shared.shared_buffers()
        assert isinstance(buffer, np.ndarray) and buffer.shape == (1000,)
        first = None
        for g in grads:
            expected = wire.step(g)
            buffer[:] = g
            params = shared.step(buffer, copy=False)
            first = params if first is None else first
            assert params.tobytes() == expected.tobytes()
        assert first is not params and first.tobytes() == params.tobytes()  # one region, written over
        assert plain.create_session(start, "adam").shared_buffers() is None  # over the wire


@pytest.mark.parametrize("sealing", [True, False])
def test_answers_are_regions_nothing_writes_while_they_are_viewed(server_with_regions, sealing, monkeypatch):
    """``step(grads)`` has the server write the params into an answer region no array views any more
    (two at most, registered on first need) and answers its views, with no copy: an answer the caller
    keeps is never written over. With both still viewed, or over /dev/shm files (whose views cannot be
    told), the params are copied out of the params region into memory of an earlier answer nothing views."""
    import mmap

    from optim_client import OptimClient, _shm

    monkeypatch.setattr(_shm, "SEALING", sealing)

    def mapped(array: np.ndarray) -> bool:  # a view of a mapped region, not memory of its own
        while isinstance(array, np.ndarray) and array.base is not None:
            array = array.base
        return isinstance(array, memoryview) and isinstance(array.obj, mmap.mmap)

    grad = np.ones(1000, np.float32)
    with OptimClient(server_with_regions.url, shared_memory=True) as client:
        session = client.create_session(np.zeros(1000, np.float32), "sgd", lr=1.0)
        kept = [session.step(grad) for _ in range(3)]
        assert [a[0] for a in kept] == [-1, -2, -3]  # each as it came, though the regions moved on
        assert [mapped(a) for a in kept] == [sealing, sealing, False]  # the third, copied
        del kept
        seen = []
        for k in range(4, 10):
            out = session.step(grad)
            assert out[0] == -k and mapped(out) == sealing
            seen.append(out.__array_interface__["data"][0])
        assert len(set(seen[1:])) == 2 and seen[1] == seen[3] == seen[5], seen  # two regions (or buffers), in turn
        registered = httpx.get(f"{server_with_regions.url}/v1/shm/regions").json()
        assert len(registered) == (4 if sealing else 2)  # g, p and two answers


def test_answers_fall_back_to_a_copy_at_the_servers_cap_of_regions():
    """A server that lets a key hold only one answer region more: the SDK registers it, is refused
    the second, asks no more, and copies the answers it cannot write into a free region."""
    from optim_client import OptimClient

    server = ServerProcess("--store", "memory", env={"OPTIM_SHM": "true", "OPTIM_SHM_REGIONS_PER_KEY": "3"})
    try:
        with OptimClient(server.url, shared_memory=True) as client:
            session = client.create_session(np.zeros(100, np.float32), "sgd", lr=1.0)
            kept = [session.step(np.ones(100, np.float32)) for _ in range(4)]
            assert [a[0] for a in kept] == [-1, -2, -3, -4]
            regions = client._shm.sessions[session.id]
            assert regions.answers == 1 and len(regions.files) == 3
            assert len(httpx.get(f"{server.url}/v1/shm/regions").json()) == 3
    finally:
        server.stop()


async def test_the_async_client_steps_through_shared_memory_as_the_sync_one(server_with_regions):
    from optim_client import AsyncOptimClient, OptimClient

    grads = np.linspace(-1, 1, 500, dtype=np.float32)
    with OptimClient(server_with_regions.url) as plain:
        expected = plain.create_session(np.zeros(500, np.float32), "rmsprop", lr=0.01).step(grads)
    async with AsyncOptimClient(server_with_regions.url, shared_memory=True) as client:
        session = await client.create_session(np.zeros(500, np.float32), "rmsprop", lr=0.01)
        buffers = await session.shared_buffers()
        buffers[:] = grads
        assert (await session.step(buffers, copy=False)).tobytes() == expected.tobytes()
        assert client.shared_memory_refused is None and len(client._shm.sessions) == 1
        await session.delete()
        assert client._shm.sessions == {}
    assert httpx.get(f"{server_with_regions.url}/v1/shm/regions").json() == []


def test_the_torch_drop_in_trains_through_shared_memory_as_torch_does(server_with_regions):
    import torch
    from optim_client import OptimClient
    from optim_client.torch import RemoteOptimizer

    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    local = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    remote = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    remote.load_state_dict(local.state_dict())
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    with OptimClient(server_with_regions.url, shared_memory=True) as client, \
            RemoteOptimizer(remote.named_parameters(), optimizer="adam", lr=1e-2, client=client) as opt:
        for model, optimizer in ((local, local_opt), (remote, opt)):
            for _ in range(10):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
        assert client.shared_memory_refused is None and len(client._shm.sessions) == 1
    for a, b in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def server_with_regions():
    proc = ServerProcess("--store", "memory", env={"OPTIM_SHM": "true"})
    yield proc
    proc.stop()


def sealed_memfd(nbytes: int, seals: int):
    import fcntl

    fd = os.memfd_create("test-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, f"/proc/{os.getpid()}/fd/{fd}"


async def test_a_sealed_memfd_is_mapped_and_steps_as_the_binary_body(client, tmp_path):
    """A memfd sealed against shrinking is read where the client wrote it and answered straight into
    it; one that may still shrink, or a descriptor that is not a memfd, is refused."""
    import fcntl
    import mmap

    start = np.arange(9, dtype=np.float32)
    wire, shared = await session(client, start), await session(client, start)
    fd, key = sealed_memfd(72, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    loose, loose_key = sealed_memfd(36, 0)
    frozen, frozen_key = sealed_memfd(36, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    plain = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)  # a regular file, as a store's would be
    os.ftruncate(plain, 36)
    try:
        view = np.frombuffer(mmap.mmap(fd, 72), np.float32)
        assert (await client.post("/v1/shm/regions", json={"name": "g", "key": key, "byte_size": 36})).status_code == 201
        assert (await client.post("/v1/shm/regions", json={"name": "p", "key": key, "offset": 36,
                                                           "byte_size": 36})).status_code == 201
        for body in ({"name": "x", "key": loose_key, "byte_size": 36},
                     {"name": "x", "key": f"/proc/{os.getpid()}/fd/{plain}", "byte_size": 36}):
            refused = await client.post("/v1/shm/regions", json=body)
            assert refused.status_code == 422 and "sealed against shrinking" in refused.text, refused.text
        refused = await client.post("/v1/shm/regions", json={"name": "x", "key": frozen_key, "byte_size": 36})
        assert refused.status_code == 422 and "F_SEAL_WRITE" in refused.text, refused.text
        for t in range(4):
            grads = np.linspace(-1, 1, 9, dtype=np.float32) * (t + 1)
            view[:9] = grads
            by_wire = await client.post(f"/v1/sessions/{wire}/step", content=grads.tobytes(), headers={
                "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
            answer = await client.post(f"/v1/sessions/{shared}/step", json={
                "gradients": {"region": "g"}, "params": {"region": "p"}}, headers={"Content-Type": SHM})
            assert answer.status_code == 200, answer.text
            assert view[9:].tobytes() == by_wire.content and view[:9].tobytes() == grads.tobytes()
        assert (await client.get("/v1/shm/regions/g")).json()["status"] == "ready"
        assert (await client.delete("/v1/shm/regions/g")).status_code == 204
    finally:
        os.close(fd)
        os.close(loose)
        os.close(frozen)
        os.close(plain)


async def test_a_mapped_regions_step_in_place_copies_nothing_and_is_the_binary_step(tmp_path, monkeypatch):
    """An update in place reads a sealed memfd's gradients where the client wrote them (guarded
    against a change since the proof measured them: tests/test_in_place.py) and writes the new params
    into the answer's region in its own pass: no copy either way, and bit for bit the binary step's.
    A step that does not go in place (the first, which measures the maxima) copies the gradients into
    the server's memory first (``shm.read``: what the client writes afterwards changes nothing), and
    the params into the region after."""
    import fcntl
    import mmap

    from optim_service import shm

    fd, key = sealed_memfd(72, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    app, lifespan, client = await serve(tmp_path, shm=True, in_place_min_bytes=0)
    try:
        view = np.frombuffer(mmap.mmap(fd, 72), np.float32)
        regions = shm.Regions(Path("/dev/shm"), True, 4)
        regions.register(None, "g", key, 0, 36)
        view[:9] = 1.5
        read = shm.read(regions.span(None, {"region": "g"}, None, "gradients"), None, 1 << 20)
        view[:9] = np.nan  # the client's next gradients, written while its step would run
        assert np.frombuffer(read, np.float32).tolist() == [1.5] * 9
        regions.close()

        copies = []
        for name in ("read", "write"):
            monkeypatch.setattr(shm, name, lambda *a, _name=name, _fn=getattr(shm, name): (copies.append(_name),
                                                                                             _fn(*a))[1])
        start = np.arange(9, dtype=np.float32)
        wire, shared = await session(client, start), await session(client, start)
        for name, offset in (("g", 0), ("p", 36)):
            made = await client.post("/v1/shm/regions", json={"name": name, "key": key, "offset": offset,
                                                              "byte_size": 36})
            assert made.status_code == 201, made.text
        in_place, went = app.state.metrics.in_place._value, []
        for t in range(4):
            grads = np.linspace(-1, 1, 9, dtype=np.float32) * (t + 1)
            view[:9] = grads
            by_wire = await client.post(f"/v1/sessions/{wire}/step", content=grads.tobytes(), headers={
                "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
            before, copies[:] = in_place.get(), []
            view[9:] = np.nan  # the answer overwrites it whole
            answer = await client.post(f"/v1/sessions/{shared}/step", json={
                "gradients": {"region": "g"}, "params": {"region": "p"}}, headers={"Content-Type": SHM})
            assert answer.status_code == 200, answer.text
            assert view[9:].tobytes() == by_wire.content
            went.append((in_place.get() - before, copies[:]))
        # every step but the first, which measures the maxima, in place and with no copy
        assert went == [(0, ["read", "write"]), (1, []), (1, []), (1, [])]
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        os.close(fd)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extra", [-1, 0, 7, 1 << 20])
def test_the_sdks_copy_in_pieces_is_numpys(dtype, extra):
    """The SDK copies large arrays into and out of its regions on several threads: the same values as
    np.copyto, a float64 gradient cast into a float32 region as numpy casts it, at and around the size
    where it starts to split them."""
    from optim_client._shm import PARALLEL_COPY_BYTES, copyto

    n = PARALLEL_COPY_BYTES // np.dtype(dtype).itemsize + extra
    src = np.random.default_rng(extra + 2).standard_normal(n)
    for source in (src.astype(dtype), src):
        dst, expected = np.full(n, np.nan, dtype), np.empty(n, dtype)
        copyto(dst, source)
        np.copyto(expected, source, casting="same_kind")
        assert dst.tobytes() == expected.tobytes()


@pytest.fixture(scope="module")
def shm_app():
    """A running app with regions on (sync client), a float32 session of 9 parameters, and two
    registered regions over one file: 'g' (36 bytes) and 'small' (16 bytes)."""
    from starlette.testclient import TestClient

    f = shared_memory.SharedMemory(create=True, size=64)
    try:
        with TestClient(create_app(Settings(store="memory", shm=True)), raise_server_exceptions=False) as client:
            sid = client.post("/v1/sessions", json={"optimizer": {"type": "adam", "lr": 0.1}, "dtype": "float32",
                                                    "params": [0.5] * 9}).json()["id"]
            for name, offset, size in (("g", 0, 36), ("small", 40, 16)):
                assert client.post("/v1/shm/regions", json={"name": name, "key": "/" + f.name, "offset": offset,
                                                            "byte_size": size}).status_code == 201
            yield client, sid, f
    finally:
        f.close()
        f.unlink()


REF = st.fixed_dictionaries({"region": st.sampled_from(["g", "small", "nope", "", "g" * 200])}, optional={
    "offset": st.one_of(st.integers(-5, 80), st.floats(allow_nan=True), st.text(max_size=3)),
    "byte_size": st.one_of(st.none(), st.integers(-1, 100), st.booleans()),
    "extra": st.integers()})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grads=st.one_of(REF, st.text(max_size=5), st.none()), params=st.one_of(st.none(), REF),
       loss=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       content=st.floats(width=32, allow_nan=True))
def test_no_shared_memory_step_makes_a_5xx_and_a_refused_one_changes_nothing(shm_app, grads, params, loss, content):
    client, sid, f = shm_app
    np.frombuffer(f.buf, np.float32, 9)[:] = content
    body = {"gradients": grads, **({"params": params} if params is not None else {}),
            **({"loss": loss} if loss is not None else {})}
    before = client.get(f"/v1/sessions/{sid}/state").json()
    answer = client.post(f"/v1/sessions/{sid}/step", content=json.dumps(body), headers={"Content-Type": SHM})
    assert answer.status_code in (200, 404, 422), answer.text
    if answer.status_code != 200:
        assert answer.headers["content-type"] == "application/problem+json"
        assert client.get(f"/v1/sessions/{sid}/state").json() == before
