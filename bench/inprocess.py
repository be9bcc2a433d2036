"""The 100-parameter Adam JSON step through the whole app in this process, no socket: what the
service's own Python costs a small step, apart from uvicorn and the wire.

    python bench/inprocess.py [--steps N]            # median µs per step
    py-spy record -r 2000 -f raw -o steps.txt -- python bench/inprocess.py --steps 60000

The second form is how the small step's time was found spread thin (docs/performance.md): no
function held more than 6% of it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import orjson

from optim_service.app import create_app
from optim_service.settings import Settings


def caller(app):
    async def call(method: str, path: str, body: bytes) -> list[dict]:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "path": path, "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
                 "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                             (b"content-length", b"%d" % len(body))],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}
        await app(scope, receive, send)
        assert sent[0]["status"] < 300, sent
        return sent
    return call


async def main(steps: int) -> float:
    app = create_app(Settings(store="memory"))
    async with app.router.lifespan_context(app):
        call = caller(app)
        created = await call("POST", "/v1/sessions", orjson.dumps({"params": {"w": [0.0] * 100},
                                                                    "optimizer": {"type": "adam"}}))
        path = f"/v1/sessions/{orjson.loads(created[1]['body'])['id']}/step"
        body = orjson.dumps({"gradients": {"w": [0.25] * 100}})
        for _ in range(300):
            await call("POST", path, body)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            await call("POST", path, body)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    print(f"100-param Adam JSON step, in-process: median {asyncio.run(main(args.steps)):.1f} µs")
    sys.exit(0)
