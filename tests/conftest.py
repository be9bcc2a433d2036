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
