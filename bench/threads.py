"""The update's time when steps come from several clients at once: Server-Timing compute of binary
10M float32 Adam steps, 3 client threads each stepping its own session, against one client alone.

    python bench/threads.py [--steps N]

A large step's working copy was a fresh 120 MB buffer each time: first-touch page faults and,
with transparent huge pages, compaction stalls made it 8 ms or 60-90 ms. Steps now reuse a buffer
a previous step finished with (``record.BufferPool``), and large updates run on one long-lived
thread, timed there (not its wait behind the others'). With the memory store a session stays warm
however large (three 10M sessions overflowed the 256 MB warm cache, and every step of an evicted
one faulted in a fresh buffer). Prints the median, 90th percentile and worst compute time of each,
each session's first WARM_UP steps left out alike, and the worst's ratio to the lone client's
median (target: no step over 3× it). ``--env NAME=VALUE`` sets the server's environment, to compare
threading layers and wait policies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading

import numpy as np

from common import Server
from optim_client import OptimClient

N = 10_000_000
WARM_UP = 2  # steps of each session not counted, for every client alike


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (to compare)")
    args = parser.parse_args()
    service = Server("service", env=dict(e.split("=", 1) for e in args.env))
    try:
        def run(times: list[float], steps: int) -> None:
            with OptimClient(service.url, timeout=120) as client:
                session = client.create_session({"w": np.zeros(N, np.float32)}, "adam")
                grad = {"w": np.full(N, 0.5, np.float32)}
                import httpx  # the SDK returns params; Server-Timing is on the raw answer

                with httpx.Client(base_url=service.url, timeout=120) as raw:
                    body = grad["w"].tobytes()
                    for i in range(steps):
                        answer = raw.post(f"/v1/sessions/{session.id}/step", content=body, headers={
                            "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
                        if i >= WARM_UP:  # a new session's first steps fault in fresh memory, alone or not
                            times.append(float(answer.headers["server-timing"].split("dur=")[1]))
                session.delete()

        alone: list[float] = []
        run(alone, args.steps)
        together: list[float] = []
        threads = [threading.Thread(target=run, args=(together, args.steps)) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        base = statistics.median(alone)
        for label, times in (("1 client", alone), (f"{args.clients} clients", together)):
            times = sorted(times)
            p90 = times[int(0.9 * (len(times) - 1))]
            print(f"| {label} | median {statistics.median(times):.1f} ms | p90 {p90:.1f} ms | worst {times[-1]:.1f} ms "
                  f"| worst / lone median {times[-1] / base:.2f}× |")
        worst = max(together) / base
        print(f"target: no step over 3× the lone median: {'met' if worst <= 3 else 'MISSED'} ({worst:.2f}×)")
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
