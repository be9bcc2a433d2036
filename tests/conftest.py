"""Shared fixtures: the app in-process (httpx ASGITransport) and a real ``optim-service serve`` process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from optim_service.app import create_app  # noqa: E402
from optim_service.settings import Settings  # noqa: E402

SERVICE_BIN = Path(sys.executable).with_name("optim-service")


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def app(request, tmp_path):
    """The app in-process on each store backend."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis_client = redis.Redis.from_url(url)
        redis_client.flushdb()  # our private server: no one else's keys
        redis_client.close()
    else:
        url = {"memory": "memory", "sqlite": f"sqlite:///{tmp_path}/api.db"}[request.param]
    application = create_app(Settings(store=url))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real ``optim-service serve`` on a free port; stopped (or killed) by the test."""

    def __init__(self, *args: str, env: dict | None = None, replace_port: bool = False):
        given = "--port" in args and not replace_port
        self.port = int(args[args.index("--port") + 1]) if given else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if replace_port:  # args carry their own --port {port}
            cmd = [str(SERVICE_BIN), "serve", *(a.replace("{port}", str(self.port)) for a in args)]
        elif given:
            cmd = [str(SERVICE_BIN), "serve", *args]
        else:
            cmd = [str(SERVICE_BIN), "serve", "--port", str(self.port), *args]
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a busy server never blocks on it
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy in 30 s")

    def logs(self) -> str:
        """Everything the server printed (access log and errors)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free port. Missing binary fails the run: CI must not skip Redis."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class RedisCluster:
    """A real Redis Cluster on loopback: ``masters`` masters (3 by default) and a replica each, each
    a ``redis-server --cluster-enabled yes``, joined by CLUSTER MEET, the 16,384 slots split evenly,
    each replica set by CLUSTER REPLICATE (what ``redis-cli --cluster create`` does, but for any
    number of masters: it refuses fewer than 3); ``url`` is the store URL."""

    def __init__(self, workdir, masters: int = 3):
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            pytest.fail("redis-server and redis-cli are not installed; make test installs them (redis-server)")
        self.ports = [free_port() for _ in range(2 * masters)]
        self.procs: dict[int, subprocess.Popen] = {}
        self._binary, self._dir, self._bus = binary, workdir, {}
        for port in self.ports:
            self.start(port)
        first = self.ports[0]
        for port in self.ports[1:]:
            self.cli(first, "cluster", "meet", "127.0.0.1", str(port), str(self._bus[port]))
        self._until(lambda: all(len(self.cli(p, "cluster", "nodes").splitlines()) == len(self.ports)
                                for p in self.ports), "the nodes did not meet")
        for i, port in enumerate(self.ports[:masters]):
            self.cli(port, "cluster", "addslotsrange", str(i * 16384 // masters), str((i + 1) * 16384 // masters - 1))
        for master, replica in zip(self.ports[:masters], self.ports[masters:]):
            master_id = self.cli(master, "cluster", "myid").strip()
            self._until(lambda: master_id in self.cli(replica, "cluster", "nodes"), "a replica does not see its master")
            self.cli(replica, "cluster", "replicate", master_id)
        self.wait_ok()
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:masters])

    @staticmethod
    def _until(ready, failure: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.1)

    def start(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [self._binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self._bus.setdefault(port, free_port())),  # port + 10000 may not exist
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000", "--save", "",
             "--appendonly", "no", "--dir", str(self._dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, and every live replica's link to its master is up."""
        def ok() -> bool:
            live = [p for p, proc in self.procs.items() if proc.poll() is None]
            infos = [self.cli(p, "info", "replication") for p in live]
            return (all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in live)
                    and all("master_link_status:up" in i for i in infos if "role:slave" in i))
        self._until(ok, "the Redis cluster did not come up", timeout)

    def master_of(self, key: str) -> tuple[int, int]:
        """(the port of the master that holds ``key``'s slot, the port of its replica)."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key))
        nodes = [line.split() for line in self.cli(self.ports[0], "cluster", "nodes").splitlines()]
        for node in nodes:
            if "master" in node[2] and "fail" not in node[2] and any(
                    _covers(r, slot) for r in node[8:]):
                port = int(node[1].split(":")[1].split("@")[0])
                replica = next(int(n[1].split(":")[1].split("@")[0]) for n in nodes if n[3] == node[0])
                return port, replica
        raise RuntimeError(f"no master holds slot {slot}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def _covers(spec: str, slot: int) -> bool:
    low, _, high = spec.partition("-")
    return low.isdigit() and int(low) <= slot <= int(high or low)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="session")
def server():
    proc = ServerProcess("--store", "memory")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fuzz_client():
    """A running app (sync client), one Adam float32 session, and a reader of its raw stored record."""
    from starlette.testclient import TestClient

    application = create_app(Settings(store="memory"))
    with TestClient(application) as client:
        body = {"optimizer": {"type": "adam", "lr": 0.1}, "dtype": "float32",
                "params": {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5]}}
        sid = client.post("/v1/sessions", json=body).json()["id"]
        client.post(f"/v1/sessions/{sid}/step", json={"gradients": {"w": [[0.1, 0.1], [0.1, 0.1]], "b": [0.1]}})
        store = application.state.sessions.store

        def stored(session_id: str):
            return client.portal.call(store.get, session_id)

        yield client, sid, stored
