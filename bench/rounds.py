"""A synchronous round of 8 contributions of 1M float32, against its floor, measured side by side.

    python bench/rounds.py [--repeat N]

The round: 8 binary contributions to an Adam session with ``"contributions": 8`` on the memory
store, sent one after another by http.client, timed from the first byte sent to the answer of the
eighth (the one that commits). Its floor: 8 raw TCP echoes of the same 4 MB (the wire time of 8
binary steps) plus one step's compute (the Server-Timing of a 1M Adam step). Target ≤ 1.5×. Also
printed: the commit latency (the eighth contribution's request alone) against one plain binary step.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import time

import numpy as np

from common import Server, TcpEcho, row
from optim_client import OptimClient

N, K = 1_000_000, 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    service, tcp = Server("service"), TcpEcho()
    try:
        client = OptimClient(service.url)
        rounds = client.create_session({"w": np.zeros(N, np.float32)}, "adam",
                                       aggregation={"mode": "sync", "contributions": K})
        plain = client.create_session({"w": np.zeros(N, np.float32)}, "adam")
        grad = np.full(N, 0.5, np.float32).tobytes()
        echo = tcp.client()
        conn = http.client.HTTPConnection("127.0.0.1", service.port)  # one keep-alive connection

        def contribute(worker: int) -> tuple[int, float]:
            started = time.perf_counter()
            conn.request("POST", f"/v1/sessions/{rounds.id}/step", body=grad, headers={
                "Content-Type": "application/octet-stream", "Accept": "application/octet-stream",
                "Optim-Worker": f"w{worker}"})
            response = conn.getresponse()
            response.read()
            return response.status, (time.perf_counter() - started) * 1e3

        def step() -> float:
            conn.request("POST", f"/v1/sessions/{plain.id}/step", body=grad, headers={
                "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
            response = conn.getresponse()
            response.read()
            return float(response.headers["server-timing"].split("dur=")[1])

        round_ms, floor_ms, commit_ms, step_ms = [], [], [], []
        for i in range(args.repeat + 2):  # the first two warm up
            started = time.perf_counter()
            answers = [contribute(w) for w in range(K)]
            elapsed = (time.perf_counter() - started) * 1e3
            assert [s for s, _ in answers] == [202] * (K - 1) + [200], answers
            t = time.perf_counter()
            for _ in range(K):
                echo(grad)
            wire = (time.perf_counter() - t) * 1e3
            compute = step()
            t = time.perf_counter()
            step()
            plain_ms = (time.perf_counter() - t) * 1e3
            if i >= 2:
                round_ms.append(elapsed)
                floor_ms.append(wire + compute)
                commit_ms.append(answers[-1][1])
                step_ms.append(plain_ms)
        print("| measurement | value | floor | floor value | ratio | target | |")
        print("|---|---:|---|---:|---:|---|---|")
        print(row(f"round of {K} × 1M float32 contributions, binary", statistics.median(round_ms),
                  f"{K} TCP echoes of 4 MB + one step's compute", statistics.median(floor_ms), 1.5))
        print(row("(context) the committing contribution alone", statistics.median(commit_ms),
                  "one plain binary 1M step", statistics.median(step_ms), None))
    finally:
        service.stop()
        tcp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
