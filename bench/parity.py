"""How close the service's updates are to torch.optim's: 100 steps of every optimizer on 1,000
random parameters with random gradients, the fused kernels and the numpy reference each against
torch (foreach=False), in float64 and float32. Prints the worst element's relative and absolute
difference. docs/math.md quotes it."""

from __future__ import annotations

import numpy as np
import torch

from optim_service.optim.config import TrainingConfig, apply_step

CASES = [
    ("adam", torch.optim.Adam, {"lr": 0.01}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05}),
]
STEPS, SIZE = 100, 1000


def worst(dtype, name: str, cls, hp: dict, fused: bool, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(SIZE).astype(dtype)
    theirs = torch.tensor(param.copy(), requires_grad=True)
    config = TrainingConfig.model_validate({"optimizer": {"type": name, **hp}})
    states = [config.algorithm.init(param, config.optimizer)]
    local = cls([theirs], foreach=False, **hp)
    for t in range(1, STEPS + 1):
        grad = rng.standard_normal(SIZE).astype(dtype)
        apply_step(config, [config.optimizer], [param], [grad.copy()], states, t, fused)
        theirs.grad = torch.from_numpy(grad)
        local.step()
    ref = theirs.detach().numpy()
    diff = np.abs(param - ref)
    return float(np.max(diff / np.abs(ref))), float(np.max(diff))


def main() -> None:
    print(f"{STEPS} steps, {SIZE} parameters; worst element against torch.optim (foreach=False)")
    print(f"{'dtype':<8} {'optimizer':<9} {'relative':>9} {'absolute':>9}")
    for dtype in (np.float64, np.float32):
        for name, cls, hp in CASES:
            rel, abs_ = (max(v) for v in zip(*(worst(dtype, name, cls, hp, fused) for fused in (True, False))))
            print(f"{np.dtype(dtype).name:<8} {name:<9} {rel:>9.1e} {abs_:>9.1e}")


if __name__ == "__main__":
    main()
