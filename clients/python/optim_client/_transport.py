"""Faster httpx transports, sync and async twins: one socket write per request, the answer's head parsed
by httptools (llhttp), and a body of known length read in one call.

httpx's default transports (httpcore + h11) read a response 64 KiB at a time and re-assemble it, so a
4 MB answer costs about twice the wire time, and their per-request bookkeeping is most of a small
step's client time; ``http.client`` writes headers and body in two packets and parses headers with
the ``email`` package. These plug in through httpx's own extension point, so timeouts, headers and
the client's API stay httpx's. Connections are kept alive (one per thread and host for the sync
twin, a pool per host for the async one); one the server closed while idle is noticed before use.

No body is copied on its way: a request's pieces (the SDK sends a step's arrays as they are) go out
one after another, and a body of known length is read straight from the socket into one writable
buffer (the async twin's protocol reads into memory it chooses), which is also handed over as
``extensions[WRITABLE_BODY]``: the SDK's arrays view it, where reading ``content`` would copy it again.
A request may name that buffer (``extensions[BODY_INTO]``): memory reused from an earlier answer
costs only the copy, where a fresh one costs its first-touch page faults too.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading

import httptools
import httpx

JOIN_BELOW = 1 << 16  # a request body this small goes out joined to its head, in one write
MAX_HEAD = 1 << 16
MAX_IDLE = 20  # kept-alive connections per host for the async twin, as httpx's own pool keeps
STREAM_LIMIT = 1 << 18  # what the async twin reads at a time outside a body of known length
WRITE_SIZE = 1 << 22  # what it hands its transport at a time
WRITABLE_BODY = "optim_client.writable_body"
BODY_INTO = "optim_client.body_into"  # a request extension: ``length -> bytearray`` the body is read into
_THREAD = threading.local()


def _scratch() -> memoryview:
    """Where the async twin's reads outside a body of known length go: one buffer per thread (its
    event loop's), not 256 KiB per connection; a read's bytes are taken before the next read. A
    view: TLS reads into slices of it, and a bytearray's slice would be a copy."""
    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        scratch = _THREAD.scratch = memoryview(bytearray(STREAM_LIMIT))
    return scratch


def _writes(request: httpx.Request, body: list) -> list:
    """The request as one write (head and a small body joined: the server wakes once), or the head
    and then the body's own pieces (bytes-like, sized in bytes): no copy of a large body."""
    lines = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1".encode()]
    lines += [name + b": " + value for name, value in request.headers.raw if name.lower() != b"accept-encoding"]
    lines.append(b"Accept-Encoding: identity")  # the body is handed over as received
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return [head + b"".join(body)] if sum(map(len, body)) < JOIN_BELOW else [head, *body]


class _Answer:
    """One response: httptools reads its head; a body of known length is then read without the parser,
    a chunked one (or one that runs to the connection's end) is fed through it."""

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    def read_head(self, head: bytes) -> int | None:
        """Parse the status line and headers; the body's length, or None when it is not declared."""
        if len(head) > MAX_HEAD:
            raise httptools.HttpParserError("response headers over 64 KiB")
        self.parser.feed_data(head)
        if self.done or self.request.method == "HEAD":  # no body: 204, 304, Content-Length: 0
            return 0
        length = next((v for k, v in self.headers if k.lower() == b"content-length"), b"")
        return int(length) if length.isdigit() else None

    def feed(self, chunk: bytes) -> None:
        """More of an undeclared body; b"" when the connection ended."""
        self.parser.feed_data(chunk)

    def response(self, body: bytes | bytearray | None = None) -> tuple[httpx.Response, bool]:
        content = b"".join(self.chunks) if body is None else body
        extensions = {"http_version": b"HTTP/1.1"}
        if isinstance(content, bytearray):
            extensions[WRITABLE_BODY] = content
        response = httpx.Response(self.parser.get_status_code(), headers=self.headers,
                                  stream=httpx.ByteStream(content), request=self.request, extensions=extensions)
        return response, self.parser.should_keep_alive()


def _address(url: httpx.URL) -> tuple[str, int]:
    return url.host, url.port or (443 if url.scheme == "https" else 80)


class HTTPClientTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self._local = threading.local()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        key = (request.url.scheme, request.url.host, request.url.port)
        pool = self._local.__dict__.setdefault("pool", {})
        conn = pool.pop(key, None)
        if conn is not None and _dropped(conn[0]):
            _close(conn)
            conn = None
        if conn is None:
            sock = _connect(request, timeouts.get("connect"))
            conn = sock, sock.makefile("rb")
        sock, reader = conn
        try:
            sock.settimeout(timeouts.get("write"))
            for data in _writes(request, list(request.stream)):
                sock.sendall(data)
            sock.settimeout(timeouts.get("read"))
            response, keep_alive = _receive(reader, _Answer(request), _into(request))
        except socket.timeout as e:
            _close(conn)
            raise httpx.ReadTimeout(str(e), request=request) from e
        except (OSError, httptools.HttpParserError) as e:
            _close(conn)
            raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e
        if keep_alive:
            pool[key] = conn
        else:
            _close(conn)
        return response

    def close(self) -> None:
        for conn in getattr(self._local, "pool", {}).values():
            _close(conn)
        self._local.pool = {}


def _connect(request: httpx.Request, timeout: float | None) -> socket.socket:
    try:
        sock = socket.create_connection(_address(request.url), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if request.url.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=request.url.host)
    except socket.timeout as e:
        raise httpx.ConnectTimeout(str(e), request=request) from e
    except OSError as e:
        raise httpx.ConnectError(str(e), request=request) from e
    return sock


def _into(request: httpx.Request):
    return request.extensions.get(BODY_INTO) or bytearray


def _receive(reader, answer: _Answer, into=bytearray) -> tuple[httpx.Response, bool]:
    lines, size = [], 0
    while not lines or lines[-1] not in (b"\r\n", b"\n"):
        line = reader.readline(MAX_HEAD + 1)
        if not line:
            raise ConnectionError("the server closed the connection before answering")
        lines.append(line)
        size += len(line)
        if size > MAX_HEAD:
            break  # read_head refuses it
    length = answer.read_head(b"".join(lines))
    if length is None:
        while not answer.done:
            chunk = reader.read1(JOIN_BELOW)
            answer.feed(chunk)
            if not chunk:
                break
        return answer.response()
    body = into(length)  # the one copy, from the kernel to memory the caller may keep and write
    view, got = memoryview(body), 0
    while got < length:
        n = reader.readinto(view[got:])
        if not n:
            raise ConnectionError(f"the server closed the connection after {got} of {length} bytes")
        got += n
    return answer.response(body)


def _close(conn) -> None:
    conn[1].close()
    conn[0].close()


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent junk): do not reuse it."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class AsyncHTTPClientTransport(httpx.AsyncBaseTransport):
    """The async twin, on one ``_Connection`` per exchange. The read timeout bounds each of the head
    and the body."""

    def __init__(self) -> None:
        self._idle: dict[tuple, list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        key = (request.url.scheme, request.url.host, request.url.port)
        conn = self._checkout(key) or await _aconnect(request, timeouts.get("connect"))
        keep_alive = False
        try:
            await asyncio.wait_for(conn.send(_writes(request, [chunk async for chunk in request.stream])),
                                   timeouts.get("write"))
            response, keep_alive = await _areceive(conn, _Answer(request), timeouts.get("read"), _into(request))
        except asyncio.TimeoutError as e:
            raise httpx.ReadTimeout("timed out", request=request) from e
        except (OSError, httptools.HttpParserError) as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e
        finally:  # a failed or cancelled exchange leaves the connection in an unknown state
            idle = self._idle.setdefault(key, [])
            if keep_alive and len(idle) < MAX_IDLE:
                idle.append(conn)
            else:
                conn.transport.close()
        return response

    def _checkout(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key, [])
        while idle:
            conn = idle.pop()
            # the socket itself too: the loop may not yet have run to see the server's FIN
            if not (conn.closed or conn.pending or conn.transport.is_closing()
                    or _dropped(conn.transport.get_extra_info("socket"))):
                return conn
            conn.transport.close()
        return None

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.transport.close()
        self._idle = {}


class _Connection(asyncio.BufferedProtocol):
    """One connection of the async twin, reading into memory it chooses: an answer's head (and a
    body of unknown length) through a reused buffer, a body of known length straight into the memory
    it is answered in. asyncio's streams copied each byte of it three times more: into the stream's
    buffer, out of it as bytes, and into that memory."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()  # read and not yet taken
        self.closed = False
        self._into: memoryview | None = None  # while set, the socket's bytes go here
        self._filled = 0
        self._wake: asyncio.Future | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=0)  # paused while anything waits to be sent: see send

    def get_buffer(self, sizehint: int):
        return _scratch() if self._into is None else self._into[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._into is None:
            self.pending += _scratch()[:nbytes]
        else:
            self._filled += nbytes
            if self._filled == len(self._into):
                self._into = None  # whole: what comes next is not this body's
        self._notify()

    def eof_received(self) -> bool:
        self.closed = True
        self._notify()
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._writable.set()
        self._notify()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, pieces: list) -> None:
        """Each piece written a slice at a time, the next once the socket took the last: the
        transport keeps a copy of what the socket does not take at once (all but a few MB of a 40 MB
        body, in fresh memory), and a slice's rest is small."""
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), WRITE_SIZE):
                self.transport.write(view[start:start + WRITE_SIZE])
                if not self._writable.is_set():
                    await self._writable.wait()
                if self.closed:
                    raise ConnectionError("the server closed the connection while the request was sent")

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _more(self) -> None:
        """Until the next read (or the connection's end)."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    async def read_head(self) -> bytes:
        while (end := self.pending.find(b"\r\n\r\n")) < 0:
            if len(self.pending) > MAX_HEAD:
                return bytes(self.pending)  # read_head refuses it
            if self.closed:
                raise ConnectionError("the server closed the connection before answering")
            await self._more()
        head = bytes(self.pending[:end + 4])
        del self.pending[:end + 4]
        return head

    async def read_some(self) -> bytes:
        """What has arrived of a body of unknown length; b"" at the connection's end."""
        while not self.pending and not self.closed:
            await self._more()
        chunk = bytes(self.pending)
        self.pending.clear()
        return chunk

    async def read_into(self, body: bytearray) -> bytearray:
        """``body`` filled: from what has arrived, then straight from the socket."""
        n = min(len(self.pending), len(body))
        body[:n] = self.pending[:n]
        del self.pending[:n]
        if n == len(body):
            return body
        self._into, self._filled = memoryview(body), n
        try:
            while self._into is not None:
                if self.closed:
                    raise ConnectionError(f"the server closed the connection after {self._filled} of "
                                          f"{len(body)} bytes")
                await self._more()
        finally:
            self._into = None  # (no view of the body outlives its read)
        return body


async def _aconnect(request: httpx.Request, timeout: float | None) -> _Connection:
    context = ssl.create_default_context() if request.url.scheme == "https" else None
    host, port = _address(request.url)
    try:
        transport, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
            _Connection, host, port, ssl=context, server_hostname=host if context else None), timeout)
    except asyncio.TimeoutError as e:
        raise httpx.ConnectTimeout("timed out", request=request) from e
    except OSError as e:
        raise httpx.ConnectError(str(e), request=request) from e
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


async def _areceive(conn: _Connection, answer: _Answer, timeout: float | None, into=bytearray):
    length = answer.read_head(await asyncio.wait_for(conn.read_head(), timeout))
    if length is None:
        while not answer.done:
            chunk = await asyncio.wait_for(conn.read_some(), timeout)
            answer.feed(chunk)
            if not chunk:
                break
        return answer.response()
    return answer.response(await asyncio.wait_for(conn.read_into(into(length)), timeout))
