"""Two versions of the service side by side on the 100-parameter JSON step, each against the echo.

    python bench/ab.py BASE_REF [--rounds N] [--requests N]

BASE_REF (a commit, branch or tag) is checked out into a temporary worktree and served as A; the
working tree is B. The client runs on one core and the three servers on the other, and each service
request follows an echo request, so that neither version runs just after the other: a server that
follows one running the same code finds that code's libraries warm in the cache (~15 µs of bias).

Why this and not bench/instructions.py for a change of a few µs: what a small step costs here is
mostly cache misses (its code and data come back cold after the client's and the kernel's turn), not
instructions. Reading a small body with orjson instead of simdjson ran as many instructions but cut
13 µs of latency. Differences between two processes of the same code measure ±3 µs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from common import Server
from optim_client import OptimClient
from wire import http_post

REPO = Path(__file__).resolve().parent.parent
BODY = orjson.dumps({"gradients": {"w": np.full(100, 0.25).tolist()}})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", help="the commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two cores: the client on one, the servers on the other")
        return 1
    client_core, server_core = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, {client_core})
    pin = ("taskset", "-c", str(server_core))
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp, "base")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
                       check=True, capture_output=True)
        servers = []
        try:
            servers = [Server("service", env={"PYTHONPATH": str(worktree / "service")}, wrapper=pin),
                       Server("service", wrapper=pin), Server("echo", wrapper=pin)]
            compare(servers, args.rounds, args.requests)
        finally:
            for server in servers:
                server.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
    return 0


def compare(servers: list[Server], rounds: int, requests: int) -> None:
    posts = []
    for server in servers[:2]:
        session = OptimClient(server.url).create_session({"w": np.zeros(100, np.float32)}, optimizer="adam")
        posts.append(_poster(server.port, f"/v1/sessions/{session.id}/step"))
    posts.append(_poster(servers[2].port, "/"))
    print("| round | A (base) | B (working tree) | echo | A/echo | B/echo | B − A |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in range(rounds):
        times: list[list[float]] = [[], [], []]
        for post in posts * 20:  # warm
            post()
        for _ in range(requests):
            for i in (0, 2, 1, 2):  # A, echo, B, echo
                started = time.perf_counter()
                posts[i]()
                times[i].append(time.perf_counter() - started)
        a, b, echo = (statistics.median(t) * 1e6 for t in times)
        print(f"| {r + 1} | {a:.1f} µs | {b:.1f} µs | {echo:.1f} µs | {a / echo:.2f}× | {b / echo:.2f}× "
              f"| {b - a:+.1f} µs |")


def _poster(port: int, path: str):
    post = http_post(port)
    return lambda: post(path, BODY, "application/json")


if __name__ == "__main__":
    sys.exit(main())
