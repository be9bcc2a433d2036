"""How close the service's updates are to torch.optim's: 100 steps of every optimizer on a 25×40 matrix of
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
    ("adamax", torch.optim.Adamax, {"lr": 0.01}),
    ("nadam", torch.optim.NAdam, {"lr": 0.01}),
    ("radam", torch.optim.RAdam, {"lr": 0.01}),
    ("adadelta", torch.optim.Adadelta, {"lr": 1.0}),
    ("rprop", torch.optim.Rprop, {"lr": 0.01}),
    ("asgd", torch.optim.ASGD, {"lr": 0.01, "t0": 50}),
    ("adafactor", torch.optim.Adafactor, {"lr": 0.01}),
    ("muon", torch.optim.Muon, {"lr": 0.01}),
]
STEPS, SHAPE = 100, (25, 40)  # a matrix: Muon takes nothing else, Adafactor factors it


def worst(dtype, name: str, cls, hp: dict, fused: bool, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(SHAPE).astype(dtype)
    theirs = torch.tensor(param.copy(), requires_grad=True)
    config = TrainingConfig.model_validate({"optimizer": {"type": name, **hp}})
    states = config.initial_states(["w"], [param], [config.optimizer])
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)  # torch's scalar state's
    try:
        local = cls([theirs], foreach=False, **hp)
    except TypeError:  # Muon has one path only
        local = cls([theirs], **hp)
    for t in range(1, STEPS + 1):
        grad = rng.standard_normal(SHAPE).astype(dtype)
        apply_step(config, [config.optimizer], [param], [grad.copy()], states, t, fused)
        theirs.grad = torch.from_numpy(grad)
        local.step()
    ref = theirs.detach().numpy()
    diff = np.abs(param - ref)
    return float(np.max(diff / np.abs(ref))), float(np.max(diff))


def main() -> None:
    print(f"{STEPS} steps, a {SHAPE[0]}×{SHAPE[1]} matrix; worst element against torch.optim (foreach=False)")
    print(f"{'dtype':<8} {'optimizer':<9} {'relative':>9} {'absolute':>9}")
    for dtype in (np.float64, np.float32):
        for name, cls, hp in CASES:
            rel, abs_ = (max(v) for v in zip(*(worst(dtype, name, cls, hp, fused) for fused in (True, False))))
            print(f"{np.dtype(dtype).name:<8} {name:<9} {rel:>9.1e} {abs_:>9.1e}")


if __name__ == "__main__":
    main()
