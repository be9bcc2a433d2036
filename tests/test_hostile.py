"""What reaches the port before any authentication, tried with real sockets against a real server
process: huge and numerous headers, slow senders, bodies that stop short, more connections than the
process allows, bytes that are no HTTP, and a redirect built from Host. Each answers problem+json
or closes, and the server's memory stays bounded."""

from __future__ import annotations

import gc
import http.client
import json
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from conftest import ServerProcess, free_port
from optim_service.api.connection import LimitedHttpProtocol
from optim_service.app import create_app
from optim_service.settings import Settings

LIMITS = {"OPTIM_HEADER_TIMEOUT_SECONDS": "1", "OPTIM_BODY_IDLE_TIMEOUT_SECONDS": "1",
          "OPTIM_MAX_CONNECTIONS": "40", "OPTIM_MAX_HEADER_BYTES": "16384", "OPTIM_MAX_HEADERS": "50",
          "OPTIM_API_KEYS": "k1"}
AUTH = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def limited():
    proc = ServerProcess("--store", "memory", env=LIMITS)
    yield proc
    proc.stop()


def rss_kib(proc: ServerProcess) -> int:
    with open(f"/proc/{proc.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one answer, read until the server closes or the body is whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def problem(status: int, headers: dict, body: bytes) -> dict:
    assert headers["content-type"] == "application/problem+json", (status, headers, body)
    doc = json.loads(body)
    assert doc["status"] == status and doc["detail"]
    return doc


def test_a_huge_header_gets_431_after_the_limit_not_after_it_is_read(limited):
    before = rss_kib(limited)
    sock = connect(limited)
    sock.sendall(b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        for _ in range(64):  # 64 MiB, as the attack that grew the server by 124 MiB
            sock.sendall(b"a" * (1 << 20))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 64, "the server read a 64 MiB header to the end"
    status, headers, body = read_answer(sock)
    if status:  # the answer can be lost to the reset of a connection still sending
        assert status == 431
        assert "16384" in problem(431, headers, body)["detail"]
    sock.close()
    assert rss_kib(limited) - before < 16 << 10
    assert httpx.get(f"{limited.url}/healthz").status_code == 200


def test_too_many_header_fields_get_431(limited):
    sock = connect(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n")
    status, headers, body = read_answer(sock)
    assert status == 431 and "50 fields" in problem(431, headers, body)["detail"]
    assert closed_by_server(sock, 2)


def test_a_header_sent_a_byte_at_a_time_times_out(limited):
    sock = connect(limited)
    started = time.monotonic()
    status = None
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            sock.send(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > 5:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, headers, body = read_answer(sock)
    assert status == 408 and problem(408, headers, body)
    assert time.monotonic() - started < 3  # the 1 s limit, not the sender's pace


def test_a_body_that_stops_short_times_out_and_changes_nothing(limited):
    created = httpx.post(f"{limited.url}/v1/sessions", headers=AUTH,
                         json={"optimizer": {"type": "sgd", "lr": 0.1}, "params": [1.0, 2.0]}).json()
    sock = connect(limited)
    body = json.dumps({"gradients": [1.0, 1.0]}).encode()
    sock.sendall(f"POST /v1/sessions/{created['id']}/step HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + body)
    started = time.monotonic()
    status, headers, answer = read_answer(sock)
    assert status == 408 and "stalled" in problem(408, headers, answer)["detail"]
    assert time.monotonic() - started < 3
    assert closed_by_server(sock, 2)
    after = httpx.get(f"{limited.url}/v1/sessions/{created['id']}", headers=AUTH).json()
    assert after["step"] == 0


def test_idle_and_slow_connections_are_dropped_and_capped(limited):
    """40 connections per process: slow senders beyond it are refused at once; all of them are
    closed within the header timeout; the server answers throughout, its memory bounded."""
    before = rss_kib(limited)
    socks = []
    refused = 0
    for _ in range(60):
        sock = connect(limited)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        socks.append(sock)
    time.sleep(0.2)
    for sock in socks:
        sock.settimeout(0.05)
        try:
            head = sock.recv(4096)
            if head.startswith(b"HTTP/1.1 503"):
                refused += 1
                assert b"application/problem+json" in head
        except socket.timeout:
            pass
    assert refused >= 20  # the 41st and later (a probe's own connection may hold one place)
    time.sleep(1.5)
    for sock in socks:
        assert closed_by_server(sock, 1)
        sock.close()
    assert httpx.get(f"{limited.url}/healthz").status_code == 200
    assert rss_kib(limited) - before < 16 << 10


def test_a_kept_alive_connection_holds_no_read_buffer_of_its_own(limited):
    """Reads go through uvloop's one buffer per event loop: 30 connections kept alive after a
    request hold a few KiB each, not a 256 KiB buffer each."""
    def kept_alive() -> socket.socket:
        sock = connect(limited)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock)[0] == 200
        return sock

    warm = [kept_alive() for _ in range(3)]
    before = rss_kib(limited)
    socks = [kept_alive() for _ in range(30)]
    grown = rss_kib(limited) - before
    for sock in warm + socks:
        sock.close()
    assert grown < 30 * 64, f"{grown} KiB for 30 connections"


def test_bytes_that_are_no_http_get_a_problem(limited):
    sock = connect(limited)
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")
    status, headers, body = read_answer(sock)
    assert status == 400 and problem(400, headers, body)["title"] == "Malformed HTTP request"


def test_no_redirect_is_built_from_the_host_header(limited):
    for method in ("DELETE", "GET"):
        answer = httpx.request(method, f"{limited.url}/v1/sessions/..%2F", headers={**AUTH, "Host": "evil.example"})
        assert answer.status_code == 404 and "location" not in answer.headers
        assert answer.headers["content-type"] == "application/problem+json"
    answer = httpx.get(f"{limited.url}/v1/sessions/", headers={**AUTH, "Host": "evil.example"})
    assert answer.status_code in (404, 405) and "location" not in answer.headers


def test_keep_alive_still_serves_request_after_request(limited):
    """The limits are per request: a connection that keeps answering is never cut by them."""
    with httpx.Client(base_url=limited.url, headers=AUTH) as http:
        for _ in range(3):
            assert http.get("/healthz").status_code == 200
            time.sleep(0.6)  # each pause shorter than the limits, together longer
        sid = http.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0] * 10_000}).json()["id"]
        assert http.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5] * 10_000}).status_code == 200


def test_a_large_binary_body_read_into_the_steps_memory_keeps_the_idle_limit(limited):
    """Past its first part a warm session's binary body is read straight into the step's memory:
    the idle limit still holds there. A sender that pauses under the limit each time finishes, even
    over several times the limit in all; one that stops gets 408 and the session is unchanged."""
    n = 1 << 18
    sid = httpx.post(f"{limited.url}/v1/sessions", headers=AUTH,
                     json={"optimizer": {"type": "sgd", "lr": 0.5}, "params": [0.0] * n}).json()["id"]
    body = b"\0\0\x80\x3f" * n  # float32 1.0
    octets = {**AUTH, "Content-Type": "application/octet-stream"}
    assert httpx.post(f"{limited.url}/v1/sessions/{sid}/step", content=body, headers=octets).status_code == 200
    head = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    sock, started = connect(limited), time.monotonic()
    sock.sendall(head + body[:300_000])
    for at in range(300_000, len(body), 100_000):  # 0.3 s apart, 2.4 s in all against a 1 s limit
        time.sleep(0.3)
        sock.sendall(body[at:at + 100_000])
    status, headers, answer = read_answer(sock)
    assert status == 200 and time.monotonic() - started > 2 and headers["etag"] == '"2"'

    sock = connect(limited)
    sock.sendall(head + body[:600_000])
    started = time.monotonic()
    status, headers, answer = read_answer(sock)
    assert status == 408 and "stalled" in problem(408, headers, answer)["detail"]
    assert time.monotonic() - started < 3
    after = httpx.get(f"{limited.url}/v1/sessions/{sid}/params", headers=AUTH).json()
    assert after["step"] == 2 and after["params"][0] == -1.0


def test_a_request_leaves_no_reference_cycles():
    """What a request makes (its scope, cycle, task, answer) is freed when it is done, not left to the
    garbage collector, whose passes then pause the loop every few dozen requests. An offer of a body
    sink that held its own request's cycle made 14 such objects a request."""
    app = create_app(Settings(store="memory"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=LimitedHttpProtocol,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port)

        def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            answer = conn.getresponse()
            assert answer.status in (200, 201), answer.read()
            return answer.read()

        sid = json.loads(post("/v1/sessions", json.dumps({"optimizer": {"type": "adam"}, "params": [0.0] * 100}).encode()))["id"]
        steps = [(json.dumps({"gradients": [0.25] * 100}).encode(), "application/json"),
                 (b"\0\0\x80\x3e" * 100, "application/octet-stream")]
        for body, kind in steps * 20:
            post(f"/v1/sessions/{sid}/step", body, kind)
        gc.collect()
        gc.disable()
        try:
            for body, kind in steps * 100:
                post(f"/v1/sessions/{sid}/step", body, kind)
            found = gc.collect()
        finally:
            gc.enable()
        assert found < 200, f"{found / 200:.1f} objects a request left in reference cycles"
    finally:
        server.should_exit = True
        thread.join(10)


class _WriteSpy:
    """The real transport, with each write's bytes noted on the way."""

    def __init__(self, transport, writes: list):
        self._transport, self.writes = transport, writes

    def write(self, data):
        self.writes.append(bytes(data))
        self._transport.write(data)

    def writelines(self, chunks):
        self.writes.append(b"".join(chunks))
        self._transport.writelines(chunks)

    def __getattr__(self, name):
        return getattr(self._transport, name)


def test_an_answer_leaves_in_one_write_and_head_continue_pipelining_and_keep_alive_hold():
    """A response's head waits for its body and leaves with it (one write, one segment); a HEAD
    answer, which has no body, still leaves; a 100 Continue is not held back; two pipelined requests
    are answered in order; an idle kept-alive connection is closed after the keep-alive timeout."""
    writes: list[bytes] = []

    class Spied(LimitedHttpProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._writes.transport = _WriteSpy(transport, writes)

    app = create_app(Settings(store="memory"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=Spied, log_level="warning",
                                           timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        sid = httpx.post(f"http://127.0.0.1:{port}/v1/sessions",
                         json={"optimizer": {"type": "adam"}, "params": [0.0] * 100}).json()["id"]
        step = json.dumps({"gradients": [0.25] * 100}).encode()
        request = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(step)}\r\n").encode()

        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        writes.clear()
        sock.sendall(request + b"\r\n" + step)
        status, headers, body = read_answer(sock)
        assert status == 200 and json.loads(body)["step"] == 1
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(body)

        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # answered as GET, without its body
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n") and b"content-length: 15" in head

        sock.sendall(request + b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"  # asked for before the body is sent
        sock.sendall(step)
        status, headers, body = read_answer(sock)
        assert status == 200 and json.loads(body)["step"] == 2

        sock.sendall((request + b"\r\n" + step) * 2)  # pipelined
        answers = b""
        while answers.count(b'"step":') < 2 or not answers.endswith(b"}"):
            answers += sock.recv(65536)
        assert answers.count(b"HTTP/1.1 200 OK") == 2 and re.findall(rb'"step":(\d+)', answers) == [b"3", b"4"]

        chunked = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n").encode()
        halves = step[:50], step[50:]
        sock.sendall(chunked + b"".join(b"%x\r\n%s\r\n" % (len(h), h) for h in halves) + b"0\r\n\r\n")
        status, headers, body = read_answer(sock)
        assert status == 200 and json.loads(body)["step"] == 5
        started = time.monotonic()
        assert closed_by_server(sock, 3) and 0.8 < time.monotonic() - started < 2.5
    finally:
        server.should_exit = True
        thread.join(10)
