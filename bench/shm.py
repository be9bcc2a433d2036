"""A float32 Adam step through the Python SDK over shared memory (``OptimClient(...,
shared_memory=True)`` against a server with ``OPTIM_SHM=true``), against the same step over the
wire and torch's fused Adam step in this process, timed alternately.

    python bench/shm.py [--repeat N]

Target: at 10M, ≤ 3× torch's local fused step. A plain ``step(grads)`` copies the gradients into
the SDK's region and the params out of it; with ``shared_buffers()`` (gradients written where the
step reads them) and ``step(..., copy=False)`` (params as views of the region the server writes)
the SDK copies nothing, and neither does the server when the step updates in place: its update
reads the gradients in the region and writes the params into the answer's in the same pass.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np
import torch

from common import Server, paired_ms, row
from optim_client import OptimClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    server = Server("service", env={"OPTIM_SHM": "true"})
    print("| float32 Adam step | ours | floor | floor value | ratio | target | |")
    print("|---|---:|---|---:|---:|---|---|")
    try:
        with OptimClient(server.url, timeout=120, shared_memory=True) as shm, OptimClient(server.url, timeout=120) as wire:
            for n, target in ((10_000_000, 3.0), (1_000_000, None), (100, None)):
                grads = {"w": np.full(n, 0.5, np.float32)}
                by_shm = shm.create_session({"w": np.zeros(n, np.float32)}, "adam", lr=1e-3)
                by_wire = wire.create_session({"w": np.zeros(n, np.float32)}, "adam", lr=1e-3)
                p = torch.zeros(n, requires_grad=True)
                p.grad = torch.full((n,), 0.5)
                fused = torch.optim.Adam([p], lr=1e-3, fused=True)
                repeat = args.repeat if n > 1000 else 20 * args.repeat
                ours, floor = paired_ms(lambda: by_shm.step(grads), fused.step, repeat)
                buffers = by_shm.shared_buffers()  # gradients written where the step reads them
                buffers["w"][:] = grads["w"]
                in_place, floor_2 = paired_ms(lambda: by_shm.step(buffers, copy=False), fused.step, repeat)
                over_wire, _ = paired_ms(lambda: by_wire.step(grads), fused.step, repeat)
                assert shm.shared_memory_refused is None, shm.shared_memory_refused
                label = f"{n:,}"
                print(row(f"{label}, SDK over shared memory", ours, "torch fused, local", floor, None))
                print(row(f"{label}, shared_buffers() and copy=False", in_place, "torch fused, local", floor_2, target))
                print(row(f"{label}, SDK over the wire (binary)", over_wire, "torch fused, local", floor, None))
                by_shm.delete()
                by_wire.delete()
            small_steps_beside_large(shm, wire)
    finally:
        server.stop()
    return 0


def small_steps_beside_large(shm: OptimClient, wire: OptimClient, seconds: float = 4.0) -> None:
    """Reported: a 100-parameter step's latency while another client streams 10M steps through shared
    memory, against the same small step alone. A large step's copies, passes and update run on the
    kernel thread, so the event loop answers the small one meanwhile."""
    big = shm.create_session({"w": np.zeros(10_000_000, np.float32)}, "adam", lr=1e-3)
    buffers = big.shared_buffers()
    buffers["w"][:] = 0.5
    small = wire.create_session({"w": np.zeros(100, np.float32)}, "adam", lr=1e-3)
    grads = {"w": np.full(100, 0.5, np.float32)}

    def latencies() -> list[float]:
        taken, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            small.step(grads)
            taken.append((time.perf_counter() - started) * 1e3)
            time.sleep(0.002)  # a trainer between steps, and room for the large ones
        return sorted(taken)

    def stream_large_steps() -> None:
        while not stop.is_set():
            big.step(buffers, copy=False)

    alone = latencies()
    stop = threading.Event()
    stream = threading.Thread(target=stream_large_steps)
    stream.start()
    try:
        beside = latencies()
    finally:
        stop.set()
        stream.join()
    for name, q in (("median", 0.5), ("p99", 0.99)):
        a, b = alone[int(q * (len(alone) - 1))], beside[int(q * (len(beside) - 1))]
        print(row(f"(reported) 100-param step {name}, beside a stream of 10M shm steps", b, "the same, alone", a, None))
    big.delete()
    small.delete()


if __name__ == "__main__":
    sys.exit(main())
