"""Four worker processes train one model in synchronous rounds through optim-service, and the result
equals single-process torch stepping on the average of their gradients.

    python examples/train_together.py [URL]      (a running server; default http://127.0.0.1:8000)

Each worker holds its own shard of the data and a copy of the model. It computes its gradient and
contributes it (``RemoteOptimizer.attach(..., worker=...)``: ``opt.step()`` waits for the round);
the server steps Adam once per round on the mean of the four, and every worker gets the new weights.
"""

from __future__ import annotations

import multiprocessing
import sys

import torch

from optim_client import OptimClient
from optim_client.torch import RemoteOptimizer

WORKERS, ROUNDS, LR = 4, 15, 0.05


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def shard(worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + worker)
    x = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    return x, (x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)).sin()


def loss_of(net: torch.nn.Module, worker: int) -> torch.Tensor:
    x, y = shard(worker)
    return torch.nn.functional.mse_loss(net(x), y)


def work(url: str, session_id: str, worker: int) -> None:
    net = model()
    with RemoteOptimizer.attach(session_id, net.named_parameters(), url, worker=f"worker-{worker}") as opt:
        for _ in range(ROUNDS):
            opt.zero_grad()
            loss_of(net, worker).backward()
            opt.step()  # contributes, then waits for the round's step


def main(url: str) -> int:
    net = model()
    with OptimClient(url) as client:
        params = {name: p.detach().numpy() for name, p in net.named_parameters()}
        session = client.create_session(params, "adam", lr=LR, aggregation={"mode": "sync", "contributions": WORKERS})
        processes = [multiprocessing.Process(target=work, args=(url, session.id, w)) for w in range(WORKERS)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(120)
        remote = session.refresh()
        session.delete()
    local = model()  # the same training in one process: Adam on the mean of the four gradients
    opt = torch.optim.Adam(local.parameters(), lr=LR)
    for _ in range(ROUNDS):
        grads = []
        for worker in range(WORKERS):
            local.zero_grad()
            loss_of(local, worker).backward()
            grads.append([p.grad.clone() for p in local.parameters()])
        for i, p in enumerate(local.parameters()):
            total = grads[0][i]
            for g in grads[1:]:
                total = total + g[i]
            p.grad = total / WORKERS
        opt.step()
    worst = max(float((torch.from_numpy(remote[name]) - p.detach()).abs().max())
                for name, p in local.named_parameters())
    print(f"{WORKERS} workers, {ROUNDS} rounds: largest difference from single-process torch {worst:.1e}")
    print("match" if worst < 1e-9 else "MISMATCH")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"))
