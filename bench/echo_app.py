"""The floors for the HTTP benchmarks: a minimal ASGI app that answers with the body it was sent,
the same echo as one FastAPI route (what the framework alone costs a request), and the least an
Adam step over JSON can cost in Python (what is left for the service's own guarantees)."""

import math

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response

from optim_service.optim.adam import Scalars
from optim_service.optim.adam import _adam as adam_kernel
from optim_service.optim.kernels import UNGUARDED


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


_adam = {"step": 0, "state": None}  # one session: rows are params, exp_avg, exp_avg_sq


async def adam_only(scope, receive, send):
    """A 100-parameter JSON Adam step with nothing around it: orjson, one call of the service's own
    fused kernel, the answer. No validation, store, lock, auth, request id, log or metrics, which the
    service's step all does: the gap between this and the echo is the language's share of a step."""
    if scope["type"] != "http":
        return
    message = await receive()
    body = _adam_step(message["body"]) if scope["method"] == "POST" else b""  # GET: the start-up probe
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _adam_step(request: bytes) -> bytes:
    grad = np.array(orjson.loads(request)["gradients"]["w"], np.float32)
    old = _adam["state"] if _adam["state"] is not None else np.zeros((3, grad.size), np.float32)
    new, step = np.empty_like(old), _adam["step"] + 1
    lr, beta1, beta2 = 1e-3, 0.9, 0.999
    scalars = Scalars(1.0, 0.0, 1.0, 1 - beta1, beta2, 1 - beta2, 1e-8, lr / (1 - beta1**step),
                           math.sqrt(1 - beta2**step))
    adam_kernel.serial(new[0], grad, new[1], new[2], old[0], old[1], old[2], *scalars, *UNGUARDED, new[0])
    _adam["state"], _adam["step"] = new, step
    return orjson.dumps({"step": step, "params": {"w": new[0]}}, option=orjson.OPT_SERIALIZE_NUMPY)
