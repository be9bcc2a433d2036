"""Per-step cost of each store at 1k, 100k and 1M float32 parameters (Adam), in-process; and of a
10M step on the memory store (fork, update and record around the update that bench/compute.py times).

The floor is the same step on the in-memory store, measured in the same run; a store's overhead is
its median minus that floor. "+cache" rows put the version-checked local cache (OPTIM_CACHE_BYTES)
in front. Redis is a private redis-server started here on a free port.

    python bench/stores.py [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from optim_service.optim.config import TrainingConfig
from optim_service.record import Layout
from optim_service.sessions import SessionService
from optim_service.settings import Settings
from optim_service.store import open_store

SIZES = [1_000, 100_000, 1_000_000]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def median_step_ms(store_url: str, n: int, steps: int, cache_bytes: int = 0, redis_wait_replicas: int = 0) -> float:
    settings = Settings(store=store_url, thread_offload_elements=1 << 62)
    store = open_store(store_url, cache_bytes=cache_bytes, redis_wait_replicas=redis_wait_replicas)
    service = SessionService(store, settings)
    config = TrainingConfig.model_validate({"optimizer": {"type": "adam"}})
    layout = Layout(("w",), ((n,),), "float32", "object")
    session = await service.create(None, config, layout, [np.zeros(n, np.float32)])
    grad = [np.full(n, 0.5, np.float32)]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        await service.step(None, session.id, lambda s: [grad[0].copy()])
        times.append((time.perf_counter() - started) * 1e3)
    await store.close()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    port = free_port()
    tmp = tempfile.mkdtemp()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                              "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    stores = {"memory": ("memory", 0),
              "sqlite": (f"sqlite:///{tmp}/bench.db", 0),
              "sqlite+cache": (f"sqlite:///{tmp}/bench.db", 1 << 30),
              "redis": (f"redis://127.0.0.1:{port}/0", 0),
              "redis+cache": (f"redis://127.0.0.1:{port}/0", 1 << 30)}
    try:
        print("| params | store | step ms (median) | overhead ms | × memory |")
        print("|---:|---|---:|---:|---:|")
        for n in SIZES:
            floor = asyncio.run(median_step_ms("memory", n, args.steps))
            for name, (url, cache) in stores.items():
                ms = floor if name == "memory" else asyncio.run(median_step_ms(url, n, args.steps, cache))
                print(f"| {n:,} | {name} | {ms:.3f} | {ms - floor:.3f} | {ms / floor:.2f} |")
        big = 10_000_000  # the memory store only: the step itself at the size bench/compute.py times
        print(f"| {big:,} | memory | {asyncio.run(median_step_ms('memory', big, 10)):.3f} | 0.000 | 1.00 |")
    finally:
        redis.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
