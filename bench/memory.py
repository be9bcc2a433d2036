"""Memory: what a session costs against its raw state, and the peak a 10M-parameter create and step
reach in a real server process (VmHWM, reset between phases through /proc/PID/clear_refs).

    python bench/memory.py
"""

from __future__ import annotations

import sys
import time

import numpy as np

from common import Server
from optim_client import OptimClient

N = 10_000_000


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def step_peak(pid: int, session, grad: dict) -> int:
    """The highest RSS above the settled server over a few steps of an already-stepped session."""
    session.step(grad)
    settled = status(pid, "VmRSS")
    reset_peak(pid)
    for _ in range(3):
        session.step(grad)
    return status(pid, "VmHWM") - settled


def main() -> int:
    server = Server("service")
    pid = server.proc.pid
    client = OptimClient(server.url, timeout=300)
    params_bytes = N * 4
    state_bytes = 3 * params_bytes  # Adam float32: param, exp_avg, exp_avg_sq
    try:
        time.sleep(0.5)
        base = status(pid, "VmRSS")
        reset_peak(pid)
        session = client.create_session({"w": np.zeros(N, np.float32)}, optimizer="adam")
        create_peak = status(pid, "VmHWM") - base
        held = status(pid, "VmRSS") - base
        grad = {"w": np.full(N, 0.5, np.float32)}
        adam_peak = step_peak(pid, session, grad)
        time.sleep(2)  # at rest: the working copies a step could reuse are let go of after a second
        after = status(pid, "VmRSS") - base
        print("| 10M float32 Adam session (40 MB of parameters, 120 MB of state) | bytes | × parameters | × state |")
        print("|---|---:|---:|---:|")
        for name, value in (("held after create (RSS growth)", held), ("held after steps (RSS growth)", after),
                            ("create: peak above the idle server", create_peak),
                            ("step: peak above the settled server", adam_peak)):
            print(f"| {name} | {value / 2**20:.0f} MiB | {value / params_bytes:.2f}× | {value / state_bytes:.2f}× |")
        print(f"\nsession cost: {after / state_bytes:.2f}× its raw state bytes (target ≤ 1.1×)")
        print(f"create peak: {(create_peak - held) / params_bytes:.2f} parameter-sized copies beyond the session it "
              "leaves (the decoded params, until they are joined with the optimizer state into the record; a "
              "fresh state's zeros hold no memory until written)")
        print(f"step peak: {adam_peak / params_bytes:.2f} parameter-sized copies beyond the session "
              "(the working copy of the state, with the body read into its parameters; the answer is a view of it)")
        session.delete()
        # the same step on a two-buffer state (param, momentum_buffer): a working copy of 2
        sgd = client.create_session({"w": np.zeros(N, np.float32)}, optimizer="sgd", momentum=0.9)
        print(f"step peak, SGD with momentum: {step_peak(pid, sgd, grad) / params_bytes:.2f} "
              "parameter-sized copies beyond the session")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
