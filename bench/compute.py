"""The update itself at 10M float32 — what Server-Timing: compute reports — against torch's fastest
CPU implementation of the same optimizer (the best of its single-tensor, foreach and fused paths),
measured side by side in one run: ours and torch's fastest path are timed alternately. Ours runs as
the service runs it: in place where its bound proves that safe (adam, adamw, sgd, adagrad,
rmsprop), else out of place, reading the stored state and writing the step's working copy; the
out-of-place time is shown beside it.

    python bench/compute.py [--size N] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
import numpy as np
import torch

from common import Server, median_ms, paired_ms
from optim_client import OptimClient
from optim_service.optim.config import TrainingConfig, apply_step, bound_step, measure, warm_kernels

CASES = {
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "adamax": (torch.optim.Adamax, {"lr": 2e-3}),
    "nadam": (torch.optim.NAdam, {"lr": 2e-3}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "lion": (None, {"lr": 1e-4, "weight_decay": 0.1}),  # TorchLion, below
}


class TorchLion(torch.optim.Optimizer):
    """Lion in torch ops, as lion-pytorch (the implementation people use) writes it: torch.optim has
    none, so this is torch's fastest path for it."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=False):
        if foreach:
            raise TypeError("no foreach path")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.clone().mul_(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def ours(kind: str, hp: dict, n: int, fused: bool, in_place: bool = True):
    """One step of our update over 10M elements as the service runs it, as a callable. In place
    where the bound proves it safe (the five optimizers with one; max|g| comes with the gradient
    norm a binary step's history line takes anyway, outside the update, and the maxima are the last
    step's): it writes the stored state itself. Otherwise out of place: it
    reads the stored state and writes the step's working copy (``apply_step(..., source=...)``),
    and that copy is the next step's stored state. Both sets are touched before timing: the page
    faults of a fresh working copy are the fork's, which bench/stores.py times with the whole step."""
    cfg = TrainingConfig.model_validate({"optimizer": {"type": kind, **hp}})
    grad = np.full(n, 0.5, np.float32)
    grad.flags.writeable = False  # as the service hands it over
    hps = cfg.hyperparameters_for(["w"])
    sets = []
    for _ in range(2):
        param = np.zeros(n, np.float32)
        state = cfg.algorithm.init(param, hps[0])
        for array in (param, *state):
            if array is not None:
                array.fill(0)  # touched: resident, as a stored state is
        sets.append((param, state))
    step, top = [0], [measure(cfg.algorithm, [sets[0][0]], [sets[0][1]]) if in_place and fused else None]

    def one():
        step[0] += 1
        top[0] = top[0] and bound_step(cfg, hps, top[0], 0.5, step[0], np.float32)
        if top[0] is not None:
            apply_step(cfg, hps, [sets[0][0]], [grad], [sets[0][1]], step[0], fused)
            return
        (read_p, read_s), (param, state) = sets[step[0] % 2], sets[(step[0] + 1) % 2]
        apply_step(cfg, hps, [param], [grad], [state], step[0], fused, source=([read_p], [read_s], None))

    return one


def torch_paths(cls, hp: dict, n: int) -> dict:
    """torch's step for each CPU path it has for this optimizer: single-tensor, foreach, fused."""
    paths = {}
    for mode, flags in (("single", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        p = torch.zeros(n, dtype=torch.float32, requires_grad=True)
        p.grad = torch.full((n,), 0.5)
        try:
            paths[mode] = cls([p], **hp, **flags).step
        except (RuntimeError, TypeError, ValueError):
            continue  # that path does not exist for this optimizer on the CPU
    return paths


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    warm_kernels()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}")
    print("| 10M float32 | fused kernel, as served | out of place | numpy reference | torch fastest | served ÷ torch "
          "| target | |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for kind, (cls, hp) in CASES.items():
        paths = torch_paths(cls or TorchLion, hp, args.size)
        mode = min(paths, key=lambda m, paths=paths: median_ms(paths[m], 5))  # torch's fastest path here
        # ours and torch's fastest, timed alternately so the machine's noise falls on both alike
        fused, best = paired_ms(ours(kind, hp, args.size, True), paths[mode], args.repeat)
        out = median_ms(ours(kind, hp, args.size, True, in_place=False), max(3, args.repeat // 3))
        reference = median_ms(ours(kind, hp, args.size, False), max(3, args.repeat // 3))
        ratio = fused / best
        print(f"| {kind} | {fused:.2f} ms | {out:.2f} ms | {reference:.2f} ms | {best:.2f} ms ({mode}) | {ratio:.2f}× "
              f"| ≤ 1.5× | {'met' if ratio <= 1.5 else 'MISSED'} |")
        del paths
    served_adam(args.size, args.repeat)
    return 0


def served_adam(n: int, repeat: int) -> None:
    """The figure the target names: ``Server-Timing: compute`` of binary 10M Adam steps on a real
    server, which adds to the update the first touch of each step's fresh working copy, against
    torch's fused Adam timed between them."""
    server = Server("service")
    try:
        session = OptimClient(server.url, timeout=300).create_session({"w": np.zeros(n, np.float32)},
                                                                      optimizer="adam", lr=1e-3)
        torch_step = torch_paths(torch.optim.Adam, {"lr": 1e-3}, n)["fused"]
        body = np.full(n, 0.5, np.float32).tobytes()
        served, fused = [], []
        with httpx.Client(timeout=300) as http:
            for i in range(repeat + 3):  # the first steps also compact and fault the heap
                answer = http.post(f"{server.url}/v1/sessions/{session.id}/step", content=body, headers={
                    "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"})
                answer.raise_for_status()
                started = time.perf_counter()
                torch_step()
                if i >= 3:
                    served.append(float(answer.headers["server-timing"].split("dur=")[1]))
                    fused.append((time.perf_counter() - started) * 1e3)
    finally:
        server.stop()
    ours, theirs = statistics.median(served), statistics.median(fused)
    print(f"\nIn the service (Server-Timing: compute of a binary step, median of {repeat}): adam {ours:.2f} ms "
          f"against torch fused {theirs:.2f} ms: {ours / theirs:.2f}× (target ≤ 1.5×: "
          f"{'met' if ours / theirs <= 1.5 else 'MISSED'})")


if __name__ == "__main__":
    sys.exit(main())
