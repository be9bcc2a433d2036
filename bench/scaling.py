"""Scaling out on Redis Cluster (docs/scaling.md quotes it).

1. What one step costs on one Redis, on a 3-master cluster, and on the cluster with each write
   waiting for its replica (``OPTIM_REDIS_WAIT_REPLICAS=1``), at 1k, 100k and 1M float32 Adam
   parameters, in-process (the same harness as bench/stores.py; the memory store is the floor).
2. Throughput: W client threads stepping S sessions (binary, 100k float32 Adam each) through two
   service processes, on clusters of 1, 2 and 3 masters: steps/s, and bytes/s the shards carry.

    python bench/scaling.py [--steps N] [--workers W] [--sessions S] [--seconds T]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from common import Server
from optim_client import OptimClient
from stores import median_step_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import RedisCluster, free_port, wait_for_port  # noqa: E402  (the suite's own: one way to start one)


def per_step(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisCluster(Path(tmp))
        port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no",
                                  "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            print("| params | store | step ms (median) | overhead ms | × memory |")
            print("|---:|---|---:|---:|---:|")
            for n in (1_000, 100_000, 1_000_000):
                floor = asyncio.run(median_step_ms("memory", n, steps))
                for name, url, wait in (("redis", f"redis://127.0.0.1:{port}/0", 0), ("cluster", cluster.url, 0),
                                        ("cluster + WAIT 1", cluster.url, 1)):
                    ms = asyncio.run(median_step_ms(url, n, steps, redis_wait_replicas=wait))
                    print(f"| {n:,} | {name} | {ms:.3f} | {ms - floor:.3f} | {ms / floor:.2f} |")
        finally:
            redis.terminate()
            cluster.stop()


def throughput(masters: int, workers: int, sessions: int, seconds: float, n: int = 100_000) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisCluster(Path(tmp), masters=masters)
        servers = [Server("service", store=cluster.url) for _ in range(2)]
        try:
            ids = [OptimClient(servers[0].url).create_session({"w": np.zeros(n, np.float32)}, optimizer="adam").id
                   for _ in range(sessions)]
            body = np.full(n, 0.25, np.float32).tobytes()
            done = [0] * workers
            stop = time.monotonic() + seconds

            def work(w: int) -> None:
                with httpx.Client(timeout=60) as http:
                    k = w
                    while time.monotonic() < stop:
                        url = servers[k % 2].url
                        answer = http.post(f"{url}/v1/sessions/{ids[k % sessions]}/step", content=body, headers={
                            "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
                        answer.raise_for_status()
                        done[w] += 1
                        k += workers

            threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = sum(done) / (time.monotonic() - started)
            # each step reads the record and writes it back: state (3 × 4 bytes per parameter) twice
            return rate, rate * 2 * 3 * 4 * n
        finally:
            for server in servers:
                server.stop()
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    per_step(args.steps)
    print(f"\n{args.workers} workers × {args.sessions} sessions (100k float32 Adam, binary), two service processes")
    print("| masters | steps/s | store traffic MB/s | × 1 master |")
    print("|---:|---:|---:|---:|")
    base = None
    for masters in (1, 2, 3):
        rate, traffic = throughput(masters, args.workers, args.sessions, args.seconds)
        base = base or rate
        print(f"| {masters} | {rate:.0f} | {traffic / 1e6:.0f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
