"""The floors for the HTTP benchmarks: a minimal ASGI app that answers with the body it was sent,
and the same echo as one FastAPI route (what the framework alone costs a request)."""

from fastapi import FastAPI, Request, Response


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    content_type = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


fastapi_app = FastAPI()


@fastapi_app.post("/")
async def fastapi_echo(request: Request) -> Response:
    return Response(await request.body(), media_type=request.headers.get("content-type"))
