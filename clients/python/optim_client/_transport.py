"""A faster httpx transport for large bodies: the standard library's ``http.client`` underneath.

httpx's default transport (httpcore + h11) reads a response 64 KiB at a time and re-assembles it; a
4 MB answer then costs about twice the wire time. ``http.client`` reads a body of known length with
one ``readinto``. This transport plugs in through httpx's own extension point, so timeouts, headers
and the client's API stay httpx's. One keep-alive connection per thread and host; a connection the
server closed while idle is noticed before use (as urllib3 does) rather than failing a request.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading

import httpx


class HTTPClientTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self._local = threading.local()

    def _connection(self, url: httpx.URL, timeout: float | None) -> http.client.HTTPConnection:
        pool = self._local.__dict__.setdefault("pool", {})
        key = (url.scheme, url.host, url.port)
        conn = pool.get(key)
        if conn is not None and (conn.sock is None or _dropped(conn.sock)):
            conn.close()
            conn = None
        if conn is None:
            cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            conn = pool[key] = cls(url.host, url.port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        conn = self._connection(request.url, timeouts.get("read"))
        target = request.url.raw_path.decode("ascii")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw
                   if k.lower() != b"accept-encoding"}
        headers["Accept-Encoding"] = "identity"  # the body is handed over as received
        try:
            if conn.sock is None:
                conn.connect()
        except OSError as e:
            conn.close()
            raise httpx.ConnectTimeout(str(e), request=request) if isinstance(e, socket.timeout) \
                else httpx.ConnectError(str(e), request=request) from e
        try:
            conn.request(request.method, target, body=request.read(), headers=headers)
            response = conn.getresponse()
            content = response.read()
        except socket.timeout as e:
            conn.close()
            raise httpx.ReadTimeout(str(e), request=request) from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e
        if response.will_close:
            conn.close()
        return httpx.Response(response.status, headers=response.getheaders(), content=content,
                              request=request, extensions={"http_version": b"HTTP/1.1"})

    def close(self) -> None:
        for conn in getattr(self._local, "pool", {}).values():
            conn.close()


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent junk): do not reuse it."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
