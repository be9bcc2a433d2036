"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose update runs in optim-service.

    model = torch.nn.Linear(10, 1)
    opt = RemoteOptimizer(model.parameters(), "http://127.0.0.1:8000", optimizer="adam", lr=1e-3)
    loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

Every ``step`` sends each parameter's ``.grad`` and writes the server's answer back into the
parameters, so the model trains as with the local optimizer (same numbers: the server is exact to
torch.optim). Param groups become the session's ``param_groups``; ``state_dict`` is the server's
checkpoint. The server steps every parameter on every step: a parameter without a gradient is an
error here rather than silently skipped. Learning rates change through the server's ``schedule``,
not by editing ``param_groups`` (that is refused too, so a torch LR scheduler cannot silently do
nothing).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from . import _wire
from ._client import OptimClient

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


class RemoteOptimizer(torch.optim.Optimizer):
    def __init__(self, params, base_url: str, optimizer: str = "adam", api_key: str | None = None, *,
                 schedule: dict | None = None, clip_grad_norm: dict | None = None,
                 nan_policy: str = "error", client: OptimClient | None = None, **hyperparameters: Any):
        super().__init__(params, dict(hyperparameters))
        self.kind = optimizer
        self._client = client or OptimClient(base_url, api_key)
        self._names: list[tuple[str, torch.Tensor]] = [
            (f"{g}.{i}", p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        dtypes = {p.dtype for _, p in self._names}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
            raise ValueError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
        self._dtype = _DTYPES[dtypes.pop()]
        self._options = {"schedule": schedule, "clip_grad_norm": clip_grad_norm, "nan_policy": nan_policy}
        self._hyperparameters = hyperparameters
        self._lrs = [group.get("lr") for group in self.param_groups]
        self.session = self._client.create_session(
            self._local_params(), optimizer, dtype=self._dtype, schedule=schedule, clip_grad_norm=clip_grad_norm,
            param_groups=self._group_overrides() or None, nan_policy=nan_policy, **hyperparameters)

    def _local_params(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy() for name, p in self._names}

    def _group_overrides(self) -> list[dict]:
        groups = []
        for g, group in enumerate(self.param_groups):
            overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                         if k != "params" and self.defaults.get(k, object()) != v}
            if overrides:
                groups.append({"params": [f"{g}.{i}" for i in range(len(group["params"]))], **overrides})
        return groups

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if [group.get("lr") for group in self.param_groups] != self._lrs:
            raise RuntimeError("param_groups' lr changed, but the server owns the learning rate; "
                               "pass schedule={...} to RemoteOptimizer instead of a torch LR scheduler")
        grads = {}
        for name, p in self._names:
            if p.grad is None:
                raise RuntimeError(f"parameter {name} has no gradient; the server steps every parameter")
            grads[name] = p.grad.detach().cpu().numpy()
        answer = self.session.step(grads, loss=_scalar(loss))
        for name, p in self._names:
            p.copy_(torch.from_numpy(np.asarray(answer[name])).reshape(p.shape))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The server's checkpoint (step count and torch-named buffers), plus the group layout."""
        return {"checkpoint": self.session.state(), "param_groups": self._group_overrides()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the checkpoint's optimizer state on a new session, around the current parameters."""
        checkpoint = dict(state_dict["checkpoint"])
        names, arrays = _wire.as_arrays(self._local_params(), self._dtype)
        local = {name: _wire.to_b64(a) for name, a in zip(names, arrays)}
        if set(local) != set(checkpoint["params"]):
            raise ValueError("the checkpoint's parameters do not match this optimizer's")
        checkpoint["params"] = local
        old = self.session
        self.session = self._client.restore(checkpoint)
        old.delete()


def _scalar(loss) -> float | None:
    if isinstance(loss, torch.Tensor):
        return float(loss) if loss.numel() == 1 else None
    return float(loss) if isinstance(loss, (int, float)) else None
