"""The SDK's http transports (sync and async twins) against a real uvicorn: every framing a server may answer with, timeouts,
closed and reused connections, and bodies of several megabytes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import free_port, wait_for_port
from optim_client import AsyncOptimClient, OptimClient
from optim_client._transport import WRITABLE_BODY, AsyncHTTPClientTransport, HTTPClientTransport


@pytest.fixture(scope="module")
def echo_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "transport_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=Path(__file__).parent)
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def http():
    with httpx.Client(transport=HTTPClientTransport(), timeout=5) as client:
        yield client


def _pooled(http: httpx.Client) -> dict:
    return http._transport._local.__dict__.get("pool", {})


def test_bodies_of_known_length_round_trip_and_the_connection_is_reused(http, echo_url):
    payload = np.random.default_rng(0).bytes(5_000_000)
    for body in (b"", b"x", payload):
        r = http.post(f"{echo_url}/echo", content=body)
        assert r.status_code == 200 and r.content == body
        assert r.headers["content-length"] == str(len(body))
    (conn,) = _pooled(http).values()
    r = http.post(f"{echo_url}/echo", content=b"again")
    assert r.content == b"again" and _pooled(http)[next(iter(_pooled(http)))] is conn


PIECES = [memoryview(a).cast("B") for a in (np.arange(300_000, dtype="<f4"), np.full((70, 3), -2.5, "<f8"))]
PIECES_LENGTH = {"Content-Length": str(sum(map(len, PIECES)))}  # how the SDK sends a binary step: no joined copy


def test_a_body_in_pieces_goes_out_whole_and_the_answer_is_read_into_writable_memory(http, echo_url):
    with http.stream("POST", f"{echo_url}/echo", content=PIECES, headers=PIECES_LENGTH) as r:
        body = r.extensions[WRITABLE_BODY]  # the one copy, kernel to memory the caller may keep and write
    assert "transfer-encoding" not in r.request.headers
    assert isinstance(body, bytearray) and body == b"".join(PIECES)


def test_a_chunked_answer_is_assembled(http, echo_url):
    r = http.get(f"{echo_url}/chunked")
    assert r.status_code == 200 and r.text == "one,two,three"
    assert r.headers["transfer-encoding"] == "chunked"
    assert http.post(f"{echo_url}/echo", content=b"next").content == b"next"  # the connection still works


def test_connection_close_is_honoured_and_204_has_no_body(http, echo_url):
    r = http.post(f"{echo_url}/close", content=b"bye")
    assert r.content == b"bye" and not _pooled(http)
    r = http.delete(f"{echo_url}/empty")
    assert r.status_code == 204 and r.content == b""
    assert http.post(f"{echo_url}/echo", content=b"ok").content == b"ok"


def test_a_slow_answer_times_out_and_the_next_request_gets_a_fresh_connection(echo_url):
    with httpx.Client(transport=HTTPClientTransport(), timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.get(f"{echo_url}/slow")
        assert not _pooled(http)
        assert http.post(f"{echo_url}/echo", content=b"after").content == b"after"


def test_nothing_listening_is_a_connect_error():
    with httpx.Client(transport=HTTPClientTransport(), timeout=2) as http:
        with pytest.raises(httpx.ConnectError):
            http.get(f"http://127.0.0.1:{free_port()}/")


def test_sdk_steps_a_large_session_over_it(server):
    n = 1_000_000
    with OptimClient(server.url) as client:
        session = client.create_session(np.zeros(n, np.float32), optimizer="sgd", lr=0.5)
        grad = np.linspace(-1, 1, n, dtype=np.float32)
        out = session.step(grad)
        np.testing.assert_array_equal(out, np.float32(0) - np.float32(0.5) * grad)
        assert out.flags.writeable and session.step_count == 1
        tracemalloc.start()
        session.step(grad)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # the gradients go out as they are and the answer is read once, into the memory the params view
        # (joining the body and copying the answer into writable memory made it 3 copies)
        assert 4 * n <= peak < 1.25 * 4 * n


async def test_async_sdk_steps_a_large_session_holding_one_answer(server):
    from optim_client._transport import WRITE_SIZE

    n = 4_000_000
    async with AsyncOptimClient(server.url) as client:
        session = await client.create_session(np.zeros(n, np.float32), optimizer="sgd", lr=0.5)
        grad = np.linspace(-1, 1, n, dtype=np.float32)
        tracemalloc.start()
        out = await session.step(grad)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        np.testing.assert_array_equal(out, np.float32(0) - np.float32(0.5) * grad)
        assert out.flags.writeable
        # the answer, read straight from the socket into its memory, and at most one slice of the
        # request that the socket did not take at once; asyncio's streams held up to twice the answer
        # (their buffer, the bytes read out of it), and the whole request's rest
        assert 4 * n <= peak < 4 * n + WRITE_SIZE + (1 << 20)


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_answers_reuse_memory_no_array_views_and_never_memory_one_does(server):
    """A binary answer is read into memory of an earlier one that nothing views any more (a fresh
    buffer costs page faults on top of the copy); an answer the caller keeps is never written."""
    n = 300_000
    lr, grad = np.float32(0.5), np.linspace(-1, 1, n, dtype=np.float32)
    with OptimClient(server.url) as client:
        session = client.create_session(np.zeros(n, np.float32), optimizer="sgd", lr=0.5)
        kept, expected, p = [], [], np.zeros(n, np.float32)
        for _ in range(4):  # every answer kept: each in memory of its own, and each still as it came
            kept.append(session.step(grad))
            p = p - lr * grad
            expected.append(p.copy())
        assert len({_address(a) for a in kept}) == 4
        for answer, want in zip(kept, expected):
            np.testing.assert_array_equal(answer, want)
        del kept, answer
        seen = []
        for _ in range(6):  # only the last answer held, as a training loop holds it
            out = session.step(grad)
            p = p - lr * grad
            np.testing.assert_array_equal(out, p)
            seen.append(_address(out))
        assert len(set(seen[1:])) == 2 and seen[1] == seen[3] == seen[5], seen
        tracemalloc.start()
        out = session.step(grad)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4 * n / 4  # no answer-sized allocation: the memory of two steps ago
        np.testing.assert_array_equal(out, p - lr * grad)


async def test_async_answers_reuse_memory_no_array_views(server):
    n = 300_000
    grad = np.ones(n, np.float32)
    async with AsyncOptimClient(server.url) as client:
        session = await client.create_session(np.zeros(n, np.float32), optimizer="sgd", lr=1.0)
        held = await session.step(grad)
        seen = []
        for k in range(2, 8):
            out = await session.step(grad)
            assert out[0] == -k and held[0] == -(k - 1)  # the answer still held is not written
            held = out
            seen.append(_address(out))
        assert len(set(seen[1:])) == 2 and seen[1] == seen[3] == seen[5], seen


@pytest.fixture
async def ahttp():
    async with httpx.AsyncClient(transport=AsyncHTTPClientTransport(), timeout=5) as client:
        yield client


async def test_async_twin_sends_a_body_in_pieces_and_reads_the_answer_into_writable_memory(ahttp, echo_url):
    async def pieces():
        for piece in PIECES:
            yield piece
    async with ahttp.stream("POST", f"{echo_url}/echo", content=pieces(), headers=PIECES_LENGTH) as r:
        body = r.extensions[WRITABLE_BODY]
    assert "transfer-encoding" not in r.request.headers
    assert isinstance(body, bytearray) and body == b"".join(PIECES)


async def test_async_twin_round_trips_reuses_and_assembles(ahttp, echo_url):
    payload = np.random.default_rng(1).bytes(5_000_000)
    for body in (b"", b"x", payload):
        r = await ahttp.post(f"{echo_url}/echo", content=body)
        assert r.status_code == 200 and r.content == body
    idle = ahttp._transport._idle
    (conns,) = idle.values()
    (conn,) = conns
    assert (await ahttp.post(f"{echo_url}/echo", content=b"again")).content == b"again"
    assert list(idle.values()) == [[conn]]  # the same connection, back in the pool
    r = await ahttp.get(f"{echo_url}/chunked")
    assert r.text == "one,two,three" and r.headers["transfer-encoding"] == "chunked"
    r = await ahttp.delete(f"{echo_url}/empty")
    assert r.status_code == 204 and r.content == b""


async def test_async_twin_concurrent_requests_open_their_own_connections(ahttp, echo_url):
    from optim_client._transport import MAX_IDLE

    bodies = [bytes([i % 256]) * (1000 * (i + 1)) for i in range(MAX_IDLE + 10)]
    answers = await asyncio.gather(*(ahttp.post(f"{echo_url}/echo", content=b) for b in bodies))
    assert [a.content for a in answers] == bodies
    assert 1 < sum(len(c) for c in ahttp._transport._idle.values()) <= MAX_IDLE  # the rest were closed


async def test_async_twin_close_timeout_and_refusal(echo_url):
    async with httpx.AsyncClient(transport=AsyncHTTPClientTransport(), timeout=0.5) as http:
        r = await http.post(f"{echo_url}/close", content=b"bye")
        assert r.content == b"bye" and not any(http._transport._idle.values())
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{echo_url}/slow")
        assert not any(http._transport._idle.values())
        assert (await http.post(f"{echo_url}/echo", content=b"after")).content == b"after"
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{free_port()}/")


async def test_async_twin_notices_a_connection_the_server_closed_while_idle(tmp_path):
    from conftest import ServerProcess

    store = f"sqlite:///{tmp_path}/db.sqlite"
    first = ServerProcess("--store", store)
    async with AsyncOptimClient(first.url, max_retries=0) as client:
        session = await client.create_session(np.zeros(8), optimizer="sgd", lr=1.0)
        await session.step(np.ones(8))
        first.stop()  # closes the kept-alive connection
        second = ServerProcess("--store", store, "--port", str(first.port))
        try:
            out = await session.step(np.ones(8))  # a fresh connection, no error
            np.testing.assert_array_equal(out, -2 * np.ones(8))
        finally:
            second.stop()


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory):
    """The same app over TLS, with a certificate for 127.0.0.1 that the test's trust store holds."""
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (Debian's openssl package)")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "transport_app:app", "--port", str(port),
                             "--log-level", "warning", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
                            cwd=Path(__file__).parent)
    wait_for_port(port)
    yield f"https://127.0.0.1:{port}", cert
    proc.terminate()
    proc.wait(10)


async def test_both_twins_speak_tls_and_verify_the_certificate(tls_url, monkeypatch):
    url, cert = tls_url
    with httpx.Client(transport=HTTPClientTransport(), timeout=5) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            http.post(f"{url}/echo", content=b"untrusted")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when a connection's TLS context is made
    body = np.random.default_rng(3).bytes(300_000)
    with httpx.Client(transport=HTTPClientTransport(), timeout=5) as http:
        assert http.post(f"{url}/echo", content=body).content == body
        assert http.get(f"{url}/chunked").text == "one,two,three"
    async with httpx.AsyncClient(transport=AsyncHTTPClientTransport(), timeout=5) as http:
        assert (await http.post(f"{url}/echo", content=body)).content == body
        assert (await http.post(f"{url}/echo", content=b"again")).content == b"again"
