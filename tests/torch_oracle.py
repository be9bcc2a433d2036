"""Runs the same gradient sequence through torch.optim, the reference every parity test compares to."""

from __future__ import annotations

import math

import numpy as np
import torch

from optim_service.optim import OPTIMIZERS

# every optimizer that names its torch.optim class (the registry's ``torch``)
TORCH_CLASSES = {name: getattr(torch.optim, o.torch) for name, o in OPTIMIZERS.items() if o.torch}
TUPLES = ("betas", "etas", "step_sizes", "eps", "ns_coefficients")  # JSON lists torch takes as tuples
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_scheduler(opt, schedule: dict | None):
    if schedule is None:
        return None
    s = dict(schedule)
    kind = s.pop("type")
    sched = torch.optim.lr_scheduler
    return {
        "inverse_sqrt": lambda: sched.LambdaLR(opt, lambda t: 1 / math.sqrt(t + 1)),
        "step": lambda: sched.StepLR(opt, **s),
        "exponential": lambda: sched.ExponentialLR(opt, **s),
        "cosine": lambda: sched.CosineAnnealingLR(opt, **s),
        "multistep": lambda: sched.MultiStepLR(opt, **s),
        "linear": lambda: sched.LinearLR(opt, **s),
    }[kind]()


def run_torch(*args, dtype: str = "float64", **kwargs):
    """``_run_torch`` with torch's default dtype the session's: torch keeps scalar state (NAdam's
    mu_product, ASGD's eta and mu) in its default dtype, and the service in the session's."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        return _run_torch(*args, dtype=dtype, **kwargs)
    finally:
        torch.set_default_dtype(default)


def _run_torch(optimizer: dict, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
              dtype: str = "float64", schedule: dict | None = None, clip: dict | None = None,
              param_groups: list[dict] | None = None, first_grad_square_avg: bool = False):
    """Return (params, state) after stepping torch through ``grads``; state is {name: {buffer: array}}."""
    hp = dict(optimizer)
    kind = hp.pop("type")
    hp.pop("square_avg_init", None)
    hp.update([(k, tuple(v)) for k, v in hp.items() if k in TUPLES and isinstance(v, list)])
    tensors = {n: torch.tensor(v, dtype=DTYPES[dtype], requires_grad=True) for n, v in params.items()}
    grouped = {n for g in param_groups or [] for n in g["params"]}
    groups = [{"params": [tensors[n] for n in params if n not in grouped]}]
    for g in param_groups or []:
        groups.append({**{k: (tuple(v) if k in TUPLES else v) for k, v in g.items() if k != "params"},
                       "params": [tensors[n] for n in g["params"]]})
    groups = [g for g in groups if g["params"]]
    opt = TORCH_CLASSES[kind](groups, **hp)
    sched = torch_scheduler(opt, schedule)
    for i, step_grads in enumerate(grads):
        for n, t in tensors.items():
            t.grad = torch.tensor(step_grads[n], dtype=DTYPES[dtype])
        if clip:
            norm_type = float(clip.get("norm_type", 2.0))
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip["max_norm"], norm_type)
        if first_grad_square_avg and i == 0:
            # The lecture's RMSProp (σ⁰ = |g⁰|): seed torch's average so its first mix yields g².
            for t in tensors.values():
                g = t.grad.clone()
                if hp.get("weight_decay", 0):
                    g = g + hp["weight_decay"] * t.detach()
                if hp.get("maximize"):
                    g = -g
                opt.state[t]["step"] = torch.tensor(0.0)
                opt.state[t]["square_avg"] = g * g
                if hp.get("momentum", 0) > 0:
                    opt.state[t]["momentum_buffer"] = torch.zeros_like(t)
                if hp.get("centered"):
                    opt.state[t]["grad_avg"] = torch.zeros_like(t)
        opt.step()
        if sched:
            sched.step()
    state = {
        n: {k: v.detach().numpy().copy() for k, v in opt.state[t].items()
            if isinstance(v, torch.Tensor) and k != "step"}
        for n, t in tensors.items()
    }
    return {n: t.detach().numpy().copy() for n, t in tensors.items()}, state
