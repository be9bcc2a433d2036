"""Two versions of the service side by side on the 100-parameter JSON step, each against the echo.

    python bench/ab.py BASE_REF [--rounds N] [--requests N] [--a-env NAME=VALUE ...]

BASE_REF (a commit, branch or tag) is checked out into a temporary worktree and served as A; the
working tree is B. The client runs on one core and the three servers on the other, and each service
request follows an echo request, so that neither version runs just after the other: a server that
follows one running the same code finds that code's libraries warm in the cache (~15 µs of bias).

Why this and not bench/instructions.py for a change of a few µs: what a small step costs here is
mostly cache misses (its code and data come back cold after the client's and the kernel's turn), not
instructions. Reading a small body with orjson instead of simdjson ran as many instructions but cut
13 µs of latency. Differences between two processes of the same code measure ±3 µs on a quiet VM;
on a noisy one two rounds of the same change read −19 µs and then −4 over four: take four or six.
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
    parser.add_argument("base", help='the commit to compare the working tree with ("." for the working tree itself)')
    parser.add_argument("--rounds", type=int, default=4, help="even: each version starts first as often")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for A only: `ab.py . --a-env OPTIM_HISTORY_STEPS=0` is what history costs")
    args = parser.parse_args()
    a_env = dict(pair.split("=", 1) for pair in args.a_env)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two cores: the client on one, the servers on the other")
        return 1
    client_core, server_core = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, {client_core})
    pin = ("taskset", "-c", str(server_core))
    with tempfile.TemporaryDirectory() as tmp:
        worktree = None if args.base == "." else Path(tmp, "base")
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
                           check=True, capture_output=True)
        try:
            a_env = {**({"PYTHONPATH": str(worktree / "service")} if worktree is not None else {}), **a_env}
            print("| round | started first | A (base) | B (working tree) | echo | A/echo | B/echo | B − A |")
            print("|---:|---|---:|---:|---:|---:|---:|---:|")
            differences = [one_round(r, a_env, pin, args.requests) for r in range(args.rounds)]
        finally:
            if worktree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
    print(f"\nB − A over the {args.rounds} rounds: mean {statistics.mean(differences):+.1f} µs "
          f"(the two orders of start weigh alike only over an even number of rounds)")
    return 0


def one_round(r: int, a_env: dict, pin: tuple[str, ...], requests: int) -> float:
    """One round on fresh servers, A started first in even rounds and B in odd ones: on this VM the
    process started first ran 15-40 µs slower, whichever code it served."""
    servers = []
    try:
        for which in ("AB" if r % 2 == 0 else "BA"):
            servers.append((which, Server("service", env=a_env if which == "A" else None, wrapper=pin)))
        a, b = (dict(servers)[k] for k in "AB")
        echo = Server("echo", wrapper=pin)
        servers.append(("echo", echo))
        posts = []
        for server in (a, b):
            session = OptimClient(server.url).create_session({"w": np.zeros(100, np.float32)}, optimizer="adam")
            posts.append(_poster(server.port, f"/v1/sessions/{session.id}/step"))
        posts.append(_poster(echo.port, "/"))
        times: list[list[float]] = [[], [], []]
        for post in posts * 20:  # warm
            post()
        for n in range(requests):
            for i in ((0, 2, 1, 2) if n % 2 else (1, 2, 0, 2)):  # A, echo, B, echo; then B first
                started = time.perf_counter()
                posts[i]()
                times[i].append(time.perf_counter() - started)
        ta, tb, te = (statistics.median(t) * 1e6 for t in times)
        print(f"| {r + 1} | {servers[0][0]} | {ta:.1f} µs | {tb:.1f} µs | {te:.1f} µs | {ta / te:.2f}× | {tb / te:.2f}× "
              f"| {tb - ta:+.1f} µs |")
        return tb - ta
    finally:
        for _, server in servers:
            server.stop()


def _poster(port: int, path: str):
    post = http_post(port)
    return lambda: post(path, BODY, "application/json")


if __name__ == "__main__":
    sys.exit(main())
