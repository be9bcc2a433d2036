"""Helpers shared by the benchmarks: servers on free ports, medians, and the ratio table."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port: ``optim-service serve``, or a floor app of echo_app.py under
    uvicorn ("echo": bare ASGI, "fastapi-echo": one FastAPI route, "adam-only": a bare Adam step)."""

    def __init__(self, kind: str, env: dict | None = None, wrapper: tuple[str, ...] = (), start_seconds: float = 30,
                 store: str = "memory"):
        """``wrapper`` runs the server under another program (valgrind, for bench/instructions.py)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "service":
            cmd = [str(BIN / "optim-service"), "serve", "--port", str(self.port), "--store", store]
        else:
            target = {"echo": "echo_app:app", "fastapi-echo": "echo_app:fastapi_app",
                      "adam-only": "echo_app:adam_only"}[kind]
            cmd = [str(BIN / "uvicorn"), target, "--port", str(self.port), "--log-level", "warning",
                   "--no-access-log"]
        self.proc = subprocess.Popen([*wrapper, *cmd], cwd=Path(__file__).parent, env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_seconds
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + ("/healthz" if kind == "service" else "/"), timeout=start_seconds)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{kind} did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class TcpEcho:
    """The wire's floor: a raw TCP echo (8-byte length, then the bytes back), in its own process so
    that it does not share the client's interpreter lock."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "tcp-echo", str(self.port)])
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("tcp echo did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def client(self):
        """A round trip of a payload: its bytes sent from where they lie and read back into memory
        reused from the last round trip, as the echo reads and sends them: the floor is the copies a
        socket makes, not a fresh buffer's page faults (a fresh 40 MB each way made it 143 ms, not 30)."""
        conn = socket.create_connection(("127.0.0.1", self.port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()

        def roundtrip(payload) -> memoryview:
            nonlocal buffer
            n = len(payload)
            conn.sendall(n.to_bytes(8, "little"))
            conn.sendall(payload)
            if len(buffer) < n:
                buffer = bytearray(n)
            return recv_exactly(conn, n, buffer)

        return roundtrip


def recv_exactly(conn, n: int, buffer: bytearray) -> memoryview | None:
    """``n`` bytes into the start of ``buffer``; None when the peer closed first."""
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return view


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paired_ms(fn_a, fn_b, repeat: int, warmup: int = 5) -> tuple[float, float]:
    """Medians of two operations timed alternately, so the machine's noise falls on both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    a, b = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        fn_a()
        a.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        fn_b()
        b.append((time.perf_counter() - t) * 1e3)
    return statistics.median(a), statistics.median(b)


def row(name: str, value: float, floor_name: str, floor: float, target: float | None, unit: str = "ms") -> str:
    ratio = value / floor
    verdict = "" if target is None else ("met" if ratio <= target else "MISSED")
    target_text = "" if target is None else f"≤ {target:g}×"
    return f"| {name} | {value:.3f} {unit} | {floor_name} | {floor:.3f} {unit} | {ratio:.2f}× | {target_text} | {verdict} |"


def _serve_tcp_echo(port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()

    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head, buffer = bytearray(8), bytearray()
        with conn:
            while recv_exactly(conn, 8, head) is not None:
                n = int.from_bytes(head, "little")
                if len(buffer) < n:
                    buffer = bytearray(n)
                conn.sendall(recv_exactly(conn, n, buffer))

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__" and sys.argv[1:2] == ["tcp-echo"]:
    _serve_tcp_echo(int(sys.argv[2]))

HEADER = "| measurement | value | floor | floor value | ratio | target | |\n|---|---:|---|---:|---:|---|---|"
__all__ = ["HEADER", "Server", "TcpEcho", "median_ms", "paired_ms", "row"]
