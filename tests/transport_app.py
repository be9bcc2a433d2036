"""A plain ASGI app under a real uvicorn for the SDK transport's tests: the answers the service itself
never gives (chunked bodies, Connection: close, a slow answer, 204) next to a large one."""

import asyncio


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/chunked":  # no Content-Length: uvicorn sends Transfer-Encoding: chunked
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/octet-stream")]
    status = 200
    if path == "/close":
        headers.append((b"connection", b"close"))
    elif path == "/slow":
        await asyncio.sleep(3)
    elif path == "/empty":
        status, body = 204, b""
    if status != 204:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
