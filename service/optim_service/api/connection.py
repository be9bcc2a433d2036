"""Limits on a connection that hold before a request reaches the app, and so before authentication.

uvicorn reads headers of any size, waits for them forever (its keep-alive timer stops at the first
byte a client sends) and waits forever for a body that stops short. ``LimitedHttpProtocol`` is its
httptools protocol with the limits a server exposed to anyone who can reach its port needs, each a
setting (SECURITY.md lists them):

- header bytes (``max_header_bytes``) and count (``max_headers``): 431, counted while they arrive,
  so a 64 MiB header costs at most the limit plus one read;
- time to receive the headers (``header_timeout_seconds``), from a request's first byte (or from
  the connection's opening): 408, whatever the pace of a slow sender;
- idle time between body bytes (``body_idle_timeout_seconds``): 408; a body the app has not asked
  for yet is the server's wait, not the client's, and is not counted;
- connections per process (``max_connections``): one over gets 503 and is closed at once.

The HTTP parser's own 400s are problem+json like every other error.

It hands a request's body to the app at once when all of it is in (``WHOLE_BODY``): a small
step's, read with its headers, then takes no ``receive()`` and the two coroutines under it. And it
offers a large body a way around uvicorn's buffer (``BodySink``): once the step has memory for
it, the rest of the body is read from the socket straight into that memory (``_SinkReader``, an
``asyncio.BufferedProtocol``, takes the transport until the body is in), where the event loop, the
parser and uvicorn would copy each part three times more and wake the app every 64 KB. Every other
read goes through ``data_received``, as uvicorn's own: a buffered protocol's two Python calls a
read showed in a small request's time (docs/performance.md).

And an answer leaves in one write (``_OneWrite``): uvicorn writes a response's head, then its body,
two system calls and two segments where one does.
"""

from __future__ import annotations

import asyncio
import functools
import threading

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..settings import Settings

# a request's phases, as far as the limits care
_IDLE, _HEADERS, _BODY, _DONE = range(4)


@functools.cache
def _settings() -> Settings:
    """The process's settings, as the app factory builds them (``optim-service serve`` passes its
    flags to every worker as OPTIM_* variables)."""
    return Settings()


def problem_bytes(status: int, title: str, detail: str) -> bytes:
    """A whole HTTP/1.1 problem+json answer that closes the connection."""
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    return b"".join([STATUS_LINE[status], b"content-type: application/problem+json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


class BodySink:
    """The rest of one request's body, read into ``view`` from byte ``filled`` to its end, each piece
    fed to ``hasher`` (when one is given) as it lands. The app sets ``view`` to None when it lets go
    of the memory; the bytes still due are then read and dropped."""

    __slots__ = ("view", "filled", "hasher")

    def __init__(self, view: memoryview, filled: int, hasher=None):
        self.view, self.filled, self.hasher = view, filled, hasher


SINK = "optim.body_sink"  # the scope's extension: sink(scope, view, filled, hasher) -> BodySink | None
WHOLE_BODY = "optim.whole_body"  # the scope's extension: whole_body(scope) -> bytes | None
DROP_SIZE = 1 << 16  # what one read takes of a body the app let go of
_THREAD = threading.local()


def _scratch() -> memoryview:
    """Where the rest of a body the app let go of is read, to be dropped: one buffer per thread (its
    event loop's), not one per connection."""
    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        scratch = _THREAD.scratch = memoryview(bytearray(DROP_SIZE))
    return scratch


class _SinkReader(asyncio.BufferedProtocol):
    """The transport's protocol while a ``BodySink`` takes the rest of a body (uvloop calls
    ``get_buffer`` only on a protocol that is not an ``asyncio.Protocol``, which uvicorn's is); it
    hands every other event to the HTTP protocol, which takes the transport back with the body's
    last byte."""

    def __init__(self, http: LimitedHttpProtocol):
        self.http = http

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http._sink_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.http._sink_updated(nbytes)

    def connection_lost(self, exc) -> None:
        self.http.connection_lost(exc)

    def eof_received(self):
        return self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what uvicorn's cycle writes before it reads an expecting body
_JOIN_MAX = 1 << 16  # a longer body goes out as two buffers in one call, not copied onto its head


class _OneWrite:
    """The connection's transport as its responses see it: the head uvicorn writes on
    ``http.response.start`` waits for the next write, the body's, and leaves with it, so that a
    small answer is one write and one segment instead of two (the ASGI spec has a server send
    nothing before the first body message). A response that writes no body (HEAD) flushes it as it
    completes (``LimitedHttpProtocol.on_response_complete``)."""

    __slots__ = ("transport", "holding", "head")

    def __init__(self, transport):
        self.transport, self.holding, self.head = transport, False, None

    def write(self, data) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if len(data) <= _JOIN_MAX:
                self.transport.write(head + data)
            else:
                self.transport.writelines((head, data))
        elif self.holding and data != _CONTINUE:
            self.holding, self.head = False, data
        else:
            self.transport.write(data)

    def flush(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class LimitedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = _settings()
        self._max_header_bytes, self._max_headers = s.max_header_bytes, s.max_headers
        self._header_timeout, self._body_idle = s.header_timeout_seconds, s.body_idle_timeout_seconds
        self._max_connections = s.max_connections
        self._phase = _IDLE
        self._header_bytes = 0
        # one timer serves every limit a connection arms (``_arm``): pending until ``_fires``, it
        # calls ``_on_due`` if still armed at ``_due``
        self._timer: asyncio.TimerHandle | None = None
        self._fires = self._due = 0.0
        self._on_due = None
        self._sink: BodySink | None = None  # while set, the socket's next bytes are its body's rest
        self._sink_left = 0

    # -- a body sink's reads, into its memory (``_SinkReader`` has the transport meanwhile) -------

    def _sink_buffer(self) -> memoryview:
        sink = self._sink
        if sink.view is None:  # the app let go: the rest is read, and dropped, to keep the framing
            return _scratch()[:min(DROP_SIZE, self._sink_left)]
        return sink.view[sink.filled:sink.filled + self._sink_left]

    def _sink_updated(self, nbytes: int) -> None:
        sink = self._sink
        self._sink_left -= nbytes
        if sink.view is not None:
            if sink.hasher is not None:
                sink.hasher.update(sink.view[sink.filled:sink.filled + nbytes])
            sink.filled += nbytes
        if self._sink_left:
            self._arm(self._body_idle, self._body_idle_expired)  # (moves no timer: see _arm)
            return
        # the parser framed this body by its length but did not read its rest: the next request
        # starts a fresh parser, and this one ends here
        self._sink = None
        self.transport.set_protocol(self)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()

    def _sink_into(self, scope, view: memoryview, filled: int, hasher=None) -> BodySink | None:
        """Called by the app (``SINK``) for the request of ``scope``, with everything parsed so far
        received: the body's remaining ``len(view) - filled`` bytes are the next on the socket."""
        cycle = self.cycle
        if (self._sink is not None or cycle is None or cycle.scope is not scope or cycle.body or not cycle.more_body
                or cycle.response_complete or self.transport.is_closing()):
            return None  # not this request's body, or not all of it handed over: the app reads on
        self._sink, self._sink_left = BodySink(view, filled, hasher), len(view) - filled
        self._arm(self._body_idle, self._body_idle_expired)
        self.transport.set_protocol(_SinkReader(self))
        return self._sink

    def _whole_body(self, scope) -> bytes | None:
        """Called by the app (``WHOLE_BODY``) before it receives any of the body of ``scope``'s
        request: the whole body, taken as the one ``receive()`` that would give it, when all of it is
        in (a small request's usually came with its headers); else None, and the app receives it."""
        cycle = self.cycle
        if cycle is None or cycle.scope is not scope or cycle.more_body or cycle.disconnected or cycle.response_complete:
            return None
        body, cycle.body = bytes(cycle.body), bytearray()
        cycle.message_event.clear()
        self.flow.resume_reading()
        return body

    # -- the connection --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._writes = _OneWrite(transport)
        self._extensions = {SINK: self._sink_into, WHOLE_BODY: self._whole_body}  # copied into each request's scope
        if len(self.connections) > self._max_connections:
            self._refuse(503, "Too many connections",
                         f"this server process holds its maximum of {self._max_connections} connections "
                         "(OPTIM_MAX_CONNECTIONS); retry shortly")
            return
        self._start_request()  # a connection that never sends a byte is dropped like a slow one

    def connection_lost(self, exc) -> None:
        self._on_due = None
        if self._timer is not None:  # not left pending, holding this connection until it fires
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _HEADERS:
            self._header_bytes += len(data)
        elif phase != _BODY:  # a request's first bytes
            self._start_request(len(data))
        # uvicorn's, less its call to cancel a keep-alive timer: this protocol's is the one ``_arm``s
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        phase = self._phase
        if phase == _HEADERS:
            if self._header_bytes > self._max_header_bytes and not self.transport.is_closing():
                self._headers_too_large()
        elif phase == _BODY and not self.transport.is_closing():
            self._arm(self._body_idle, self._body_idle_expired)

    def send_400_response(self, msg: str) -> None:
        self._cancel_timer()
        self._refuse(400, "Malformed HTTP request",
                     "the request could not be parsed as HTTP/1.1; check the request line, the header "
                     "syntax and the body's framing (Content-Length or chunked)")

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEADERS

    def on_headers_complete(self) -> None:
        self._on_due = None  # the headers' limit; the body's is armed after this read (data_received)
        headers = self.headers
        # the bytes read since the request began bound its headers' size: exact only when over
        if len(headers) > self._max_headers or (self._header_bytes > self._max_header_bytes and len(self.url) + sum(
                4 + len(name) + len(value) for name, value in headers) > self._max_header_bytes):
            self._headers_too_large()
            return
        self._phase = _BODY
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:  # (not an upgrade)
            self.cycle.transport, self._writes.holding = self._writes, True
        # the request's scope, not its cycle, is how a sink names its request: a partial over the
        # cycle, kept in the cycle's scope, made every request's objects a cycle for the collector
        given = self.scope.get("extensions")
        self.scope["extensions"] = {**given, **self._extensions} if given else self._extensions.copy()

    def on_message_complete(self) -> None:
        self._on_due = None
        self._phase = _DONE
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._arm(self.timeout_keep_alive, self.timeout_keep_alive_handler)  # answered before its body was in

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive wait on the connection's one timer (``_arm``) instead of a
        timer made and cancelled per request."""
        self._writes.flush()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._phase == _DONE:  # else when the request's rest has been read (on_message_complete)
            self._arm(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    # -- limits ----------------------------------------------------------------------------------

    def _start_request(self, received: int = 0) -> None:
        self._phase, self._header_bytes = _HEADERS, received
        self._arm(self._header_timeout, self._headers_expired)

    def _headers_too_large(self) -> None:
        self._refuse(431, "Request header fields too large",
                     f"the request's headers are over this service's limit of {self._max_header_bytes} "
                     f"bytes or {self._max_headers} fields (OPTIM_MAX_HEADER_BYTES, OPTIM_MAX_HEADERS)")

    def _headers_expired(self) -> None:
        if self._phase != _HEADERS or self.transport.is_closing():
            return
        if self._header_bytes == 0:  # nothing asked, nothing to answer
            self.transport.close()
            return
        self._refuse(408, "Request timeout",
                     f"the request's headers did not arrive within {self._header_timeout:g} s "
                     "(OPTIM_HEADER_TIMEOUT_SECONDS)")

    def _body_idle_expired(self) -> None:
        if self._phase != _BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the app has not asked for more yet: not the client's delay
            self._arm(self._body_idle, self._body_idle_expired)
            return
        self._refuse(408, "Request timeout",
                     f"the request body stalled: no byte arrived for {self._body_idle:g} s "
                     "(OPTIM_BODY_IDLE_TIMEOUT_SECONDS); nothing was changed")

    def _refuse(self, status: int, title: str, detail: str) -> None:
        """Answer ``status`` and close, unless an answer is already under way on this connection
        (then a second one would interleave with it: just close)."""
        self._cancel_timer()
        self._phase = _DONE
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(problem_bytes(status, title, detail))
        self.transport.close()  # the app, if it is reading, gets http.disconnect

    def _arm(self, seconds: float, callback) -> None:
        """``callback`` in ``seconds``, unless armed again or cancelled first. The timer moves only
        when this comes due before it fires (a limit after a longer one), and re-arms for the rest
        when it fires early: a call_later and a cancel per request phase cost a small request µs."""
        due = self.loop.time() + seconds
        self._due, self._on_due = due, callback
        if self._timer is None or self._fires > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._fires = self.loop.call_at(due, self._fire), due

    def _cancel_timer(self) -> None:
        self._on_due = None  # the timer stays, for the next limit; firing, it finds nothing armed

    def _fire(self) -> None:
        self._timer, callback = None, self._on_due
        if callback is None:
            return
        if self.loop.time() < self._due:
            self._timer, self._fires = self.loop.call_at(self._due, self._fire), self._due
            return
        self._on_due = None
        callback()
