"""The 100-parameter JSON step against the bare ASGI echo in instructions, not seconds: the server
runs under valgrind's callgrind, which counts what the CPU executes per request and simulates its
caches, so the figures are the same whatever else this shared machine is doing (wire.py's latency
ratio moves by ±0.05 between runs). Only the requests are counted, not start-up or warm-up.

    python bench/instructions.py [--requests N]

Needs valgrind (on every machine kind here); each server starts in ~1-2 minutes under it.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson

from common import Server
from optim_client import OptimClient

BODY = orjson.dumps({"gradients": {"w": np.full(100, 0.25).tolist()}})


def counted(kind: str, requests: int, out: Path) -> dict[str, float]:
    """Events per request of ``requests`` posts of BODY to a server of ``kind`` under callgrind."""
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
               f"--callgrind-out-file={out}", sys.executable)
    server = Server(kind, wrapper=wrapper, start_seconds=600)
    try:
        path = "/"
        if kind == "service":
            session = OptimClient(server.url, timeout=600).create_session({"w": np.zeros(100, np.float32)},
                                                                         optimizer="adam")
            path = f"/v1/sessions/{session.id}/step"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)

        def post():
            conn.request("POST", path, body=BODY, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()[:300]
            response.read()

        for _ in range(200):  # warm: caches, lazy imports, the allocator's pools
            post()
        subprocess.run(["callgrind_control", "--instr=on", str(server.proc.pid)], check=True, capture_output=True)
        for _ in range(requests):
            post()
        subprocess.run(["callgrind_control", "--instr=off", str(server.proc.pid)], check=True, capture_output=True)
    finally:
        server.stop()
    lines = out.read_text().splitlines()
    events = next(line for line in lines if line.startswith("events:")).split()[1:]
    totals = [line for line in lines if line.startswith("totals:")][-1].split()[1:]
    return {e: int(n) / requests for e, n in zip(events, totals)}


def cycles(events: dict[str, float]) -> float:
    """A rough cost: an instruction each, ~10 cycles an L1 miss, ~100 a last-level miss."""
    l1 = events["I1mr"] + events["D1mr"] + events["D1mw"]
    return events["Ir"] + 10 * l1 + 100 * (events["ILmr"] + events["DLmr"] + events["DLmw"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction counts")
        return 0
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:  # the two servers side by side
        step, echo = pool.map(lambda kind: counted(kind, args.requests, Path(tmp, kind)), ("service", "echo"))
    print("| per request, 100-param Adam JSON step | step | ASGI echo, same body | ratio |")
    print("|---|---:|---:|---:|")
    for label, a, b in (("instructions", step["Ir"], echo["Ir"]),
                        ("L1 instruction-cache misses", step["I1mr"], echo["I1mr"]),
                        ("L1 data-cache misses", step["D1mr"] + step["D1mw"], echo["D1mr"] + echo["D1mw"]),
                        ("estimated cycles (Ir + 10·L1 misses + 100·LL misses)", cycles(step), cycles(echo))):
        print(f"| {label} | {a / 1e3:,.0f}k | {b / 1e3:,.0f}k | {a / b:.2f}× |")
    print("\n(user-space work of the server process only: the kernel's share of a request, about the same "
          "for both, is not counted, which is why these ratios run higher than wire.py's latency ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
