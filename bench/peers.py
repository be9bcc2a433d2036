"""A peer side by side: Ray's parameter-server pattern against this service, in one run.

    pip install -e ".[bench]"   # ray; never a test dependency
    python bench/peers.py [--seconds S] [--repeat N]

Ray's pattern (its "Parameter Server" example): an actor holds the model and a torch optimizer
(fused Adam); workers call ``apply_gradients`` with numpy arrays and get the weights back, through
Ray's shared-memory object store. Ours: the Python SDK's binary step to one server process on the
memory store (and over shared memory on this host), and to two replicas on one Redis.

Prints per-step latency at 100, 1M and 10M float32 (medians, timed alternately with Ray), the
target of issue 20 (at 10M, ours over shared memory faster than the Ray actor) with its ratio, and
steps/s with 8 workers stepping one model at once at each size (threads, each its own client, for
``--seconds``).
"Shared buffers" is the SDK with nothing to copy: gradients written into ``shared_buffers()`` and
params answered as views (``step(..., copy=False)``), as a trainer whose ``p.grad`` lives there steps.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from common import Server, free_port
from optim_client import OptimClient

WORKERS = 8


def ray_actor(n: int):
    import ray
    import torch

    @ray.remote
    class ParameterServer:
        def __init__(self, n: int):
            torch.set_num_threads(2)
            self.p = torch.zeros(n, requires_grad=True)
            self.opt = torch.optim.Adam([self.p], lr=1e-3, fused=True)

        def apply_gradients(self, grad: np.ndarray) -> np.ndarray:
            self.p.grad = torch.from_numpy(grad)
            self.opt.step()
            return self.p.detach().numpy()

    actor = ParameterServer.remote(n)
    return lambda grad: ray.get(actor.apply_gradients.remote(grad))


def ours(url: str, n: int, shared_memory: bool = False):
    client = OptimClient(url, timeout=300, shared_memory=shared_memory)
    session = client.create_session({"w": np.zeros(n, np.float32)}, "adam", lr=1e-3)
    return client, session


def alternating(fns: dict, grad: np.ndarray, repeat: int) -> dict[str, float]:
    for fn in fns.values():
        fn(grad)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(grad)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def throughput(step_of_worker, seconds: float) -> float:
    """Steps/s of WORKERS threads, each stepping through its own ``step_of_worker(i)`` callable."""
    steps = [0] * WORKERS
    stop = threading.Event()
    start = threading.Barrier(WORKERS + 1)

    def run(i: int) -> None:
        step = step_of_worker(i)
        start.wait()
        while not stop.is_set():
            step()
            steps[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(steps) / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        print('Ray is not installed: pip install -e ".[bench]"')
        return 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    memory = Server("service", env={"OPTIM_SHM": "true"})
    replicas = [Server("service", store=f"redis://127.0.0.1:{port}/0") for _ in range(2)]
    try:
        print("| float32 Adam, one step | Ray actor, torch fused | ours, memory store | ours, shared memory "
              "| ours, shared buffers | ours, Redis replica | ours ÷ Ray (memory / shm / buffers / Redis) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in (100, 1_000_000, 10_000_000):
            grad = np.full(n, 0.5, np.float32)
            clients = {"memory": ours(memory.url, n), "shm": ours(memory.url, n, shared_memory=True),
                       "buffers": ours(memory.url, n, shared_memory=True), "redis": ours(replicas[0].url, n)}
            fns = {"ray": ray_actor(n), **{k: (lambda g, s=s: s.step(g)) for k, (_, s) in clients.items()}}
            buffers = clients["buffers"][1].shared_buffers()  # the gradients written where the step reads them
            buffers["w"][:] = grad
            fns["buffers"] = lambda g, s=clients["buffers"][1]: s.step(buffers, copy=False)
            repeat = args.repeat if n > 1000 else 20 * args.repeat
            ms = alternating(fns, grad, repeat)
            ratios = " / ".join(f"{ms[k] / ms['ray']:.2f}×" for k in ("memory", "shm", "buffers", "redis"))
            print(f"| {n:,} | {ms['ray']:.3f} ms | {ms['memory']:.3f} ms | {ms['shm']:.3f} ms | {ms['buffers']:.3f} ms "
                  f"| {ms['redis']:.3f} ms | {ratios} |")
            assert clients["shm"][0].shared_memory_refused is None, clients["shm"][0].shared_memory_refused
            at_10m = ms if n == 10_000_000 else None
            for client, session in clients.values():
                session.delete()
                client.close()
        verdicts = [f"{label} {at_10m[k] / at_10m['ray']:.2f}× ({'met' if at_10m[k] < at_10m['ray'] else 'MISSED'})"
                    for k, label in (("shm", "step(grads)"), ("buffers", "shared_buffers() and copy=False"))]
        print("\ntarget (issue 20): at 10M, a step over shared memory faster than Ray's actor: " + "; ".join(verdicts))
        print(f"\n| {WORKERS} workers on one model, float32 Adam | Ray actor | ours, memory store | "
              "ours, 2 replicas on Redis | ours ÷ Ray (memory / Redis) |")
        print("|---:|---:|---:|---:|---:|")
        for n in (100, 1_000_000, 10_000_000):
            grad = np.full(n, 0.5, np.float32)
            actor = ray_actor(n)
            ray_rate = throughput(lambda i: (lambda: actor(grad)), args.seconds)
            rates = {}
            for name, urls in (("memory", [memory.url]), ("redis", [r.url for r in replicas])):
                _, shared = ours(urls[0], n)
                workers = [OptimClient(urls[i % len(urls)], timeout=300) for i in range(WORKERS)]
                handles = [c.get_session(shared.id) for c in workers]
                rates[name] = throughput(lambda i: (lambda: handles[i].step(grad)), args.seconds)
                for c in workers:
                    c.close()
            print(f"| {n:,} | {ray_rate:,.0f} steps/s | {rates['memory']:,.0f} steps/s | {rates['redis']:,.0f} steps/s "
                  f"| {rates['memory'] / ray_rate:.2f}× / {rates['redis'] / ray_rate:.2f}× |")
    finally:
        memory.stop()
        for r in replicas:
            r.stop()
        redis.terminate()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
