"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose update runs in optim-service.

    model = torch.nn.Linear(10, 1)
    with RemoteOptimizer(model.named_parameters(), "http://127.0.0.1:8000", optimizer="adam", lr=1e-3) as opt:
        loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

Every ``step`` sends each parameter's ``.grad`` and writes the server's answer back into the
parameters, so the model trains as with the local optimizer (same numbers: the server is exact to
torch.optim). As in torch, a parameter whose ``.grad`` is None skips the step, its state and count
untouched. Param groups become the session's ``param_groups``. ``state_dict()`` is torch's format
(``state`` by parameter index with torch's buffer names and ``step``, ``param_groups``), which the
same local torch optimizer loads; ``load_state_dict()`` takes one from a local torch optimizer (or
from ``state_dict()``) and resumes it on the server. Learning rates change through the server's
``schedule``, not by editing ``param_groups`` (that is refused, so a torch LR scheduler cannot
silently do nothing).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch

from . import _wire
from ._client import OptimClient

# the state the server keeps for each parameter dtype; half-precision parameters travel as they are
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float32", torch.bfloat16: "float32"}
TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                 "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad, "adamax": torch.optim.Adamax,
                 "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam, "adadelta": torch.optim.Adadelta,
                 "rprop": torch.optim.Rprop, "asgd": torch.optim.ASGD, "adafactor": torch.optim.Adafactor,
                 "muon": torch.optim.Muon}
_STEPLESS = {"sgd", "muon"}  # torch keeps no "step" in these optimizers' state
_EAGER = {"adagrad"}  # torch makes this one's state in its constructor, the others' at a first update
ROUND_WAIT = 20.0  # seconds a worker's request waits for its round before it polls
_NOT_HYPERPARAMETERS = {"params", "param_names", "foreach", "capturable", "differentiable", "fused", "initial_lr"}


class RemoteOptimizer(torch.optim.Optimizer):
    def __init__(self, params, base_url: str = "http://127.0.0.1:8000", optimizer: str = "adam",
                 api_key: str | None = None, *, schedule: dict | None = None, clip_grad_norm: dict | None = None,
                 nan_policy: str = "error", client: OptimClient | None = None, aggregation: dict | None = None,
                 worker: str | None = None, **hyperparameters: Any):
        attached = hyperparameters.pop("_attach", None)  # RemoteOptimizer.attach's session
        self.worker = worker  # on a session in synchronous rounds: this process's name in them
        self.session = None
        super().__init__(params, dict(hyperparameters))
        self.kind = optimizer
        self._owns_client = client is None
        self._client = client or OptimClient(base_url, api_key)
        self._names: list[tuple[str, torch.Tensor]] = [
            (_name(group, g, i), p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        if len({n for n, _ in self._names}) != len(self._names):
            raise ValueError("parameter names repeat; name each parameter once (model.named_parameters() does)")
        dtypes = {p.dtype for _, p in self._names}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
            raise ValueError("parameters must share one floating dtype (float32, float64, float16 or bfloat16), got "
                             f"{sorted(map(str, dtypes))}")
        self._dtype = _DTYPES[dtypes.pop()]
        self._options = {"schedule": schedule, "clip_grad_norm": clip_grad_norm, "nan_policy": nan_policy}
        self._hyperparameters = hyperparameters
        self._lrs = [group.get("lr") for group in self.param_groups]
        self._attached = attached is not None
        if attached is not None:
            self.session = attached
            self._adopt_session()
        else:
            self.session = self._client.create_session(
                self._local_params(), optimizer, dtype=self._dtype, schedule=schedule, clip_grad_norm=clip_grad_norm,
                param_groups=self._group_overrides() or None, nan_policy=nan_policy, aggregation=aggregation,
                **hyperparameters)

    @classmethod
    def attach(cls, session_id: str, params, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
               client: OptimClient | None = None, worker: str | None = None) -> "RemoteOptimizer":
        """Continue an existing session with these parameters (named or not, as when it was created):
        the server's parameters are copied into them, and closing does not delete the session."""
        owns_client = client is None
        client = client or OptimClient(base_url, api_key)
        session = client.get_session(session_id)
        meta = session.metadata
        hp = {k: v for k, v in meta["optimizer"].items() if k != "type"}
        opt = cls(params, base_url, meta["optimizer"]["type"], api_key, schedule=meta["schedule"],
                  clip_grad_norm=meta["clip_grad_norm"], nan_policy=meta["nan_policy"], client=client,
                  worker=worker, _attach=session, **hp)
        opt._owns_client = owns_client
        return opt

    def _adopt_session(self) -> None:
        wire = _wire.infer_wire(self._local_params())
        if wire:  # half-precision parameters: exchange them as they are
            self.session.layout = dataclasses.replace(self.session.layout, wire=wire)
        layout = self.session.layout
        mine = {name: tuple(p.shape) for name, p in self._names}
        theirs = dict(zip(layout.names, layout.shapes))
        if mine != theirs or layout.dtype != self._dtype:
            raise ValueError(f"session {self.session.id} holds {layout.dtype} tensors {theirs}; these parameters "
                             f"are {self._dtype} {mine}")
        self._write_back(self.session.params)

    # -- torch.optim.Optimizer ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if self.session is not None:
            raise ValueError("a RemoteOptimizer's param groups are fixed when its session is created: pass every "
                             "group to the constructor (to grow a model mid-run, create a new RemoteOptimizer and "
                             "load_state_dict() the old one's state_dict())")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if [group.get("lr") for group in self.param_groups] != self._lrs:
            raise RuntimeError("param_groups' lr changed, but the server owns the learning rate; "
                               "pass schedule={...} to RemoteOptimizer instead of a torch LR scheduler")
        grads = {name: None if p.grad is None else _numpy(p.grad) for name, p in self._names}
        if all(g is None for g in grads.values()):
            return loss  # torch steps nothing either
        if self.worker is None:
            self._write_back(self.session.step(grads, loss=_scalar(loss)))
            return loss
        # a worker of a round: contribute, then wait until the round commits and take its params
        number = self.session.step_count
        params = self.session.contribute(grads, self.worker, round=number, loss=_scalar(loss), wait=ROUND_WAIT)
        while params is None:
            if self.session.round()["round"] > number:
                params = self.session.refresh()
            else:
                time.sleep(0.02)
        self._write_back(params)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict of this session: ``state`` by parameter index (torch's buffer
        names, ``step`` as a float32 tensor) and ``param_groups`` as the local torch optimizer has them."""
        checkpoint = self.session.state()
        step = checkpoint["state"]["step"]
        tensor_steps = checkpoint["state"].get("tensor_steps") or {}
        buffers = _per_tensor(checkpoint["state"]["buffers"], self.session.layout)
        state: dict[int, dict[str, Any]] = {}
        for i, (name, p) in enumerate(self._names):
            t = tensor_steps.get(name, step)
            if t == 0 and self.kind not in _EAGER:  # torch makes a parameter's state at its first update
                continue
            entry = {k: torch.from_numpy(_wire.from_b64(v, self._dtype)) for k, v in buffers[name].items()}
            if self.kind not in _STEPLESS:
                entry["step"] = torch.tensor(float(t))
            state[i] = entry
        return {"state": state, "param_groups": self._torch_groups()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume on a new session from a local torch optimizer's state_dict (or this class's), around
        the current parameters; the old session is deleted."""
        if "checkpoint" in state_dict:  # 0.1.0's form: the server's checkpoint as it was
            checkpoint = dict(state_dict["checkpoint"])
        else:
            checkpoint = self._checkpoint_from_torch(state_dict)
        params = self._local_params()
        names, arrays = _wire.as_arrays(params, _wire.infer_wire(params) or self._dtype)
        local = {name: _wire.to_b64(a) for name, a in zip(names, arrays)}
        if set(local) != set(checkpoint["params"]):
            raise ValueError("the checkpoint's parameters do not match this optimizer's")
        checkpoint["params"] = local
        old = self.session
        self.session = self._client.restore(checkpoint)
        if not self._attached:
            old.delete()
        self._attached = False  # the new session is this optimizer's own

    def close(self, delete: bool | None = None) -> None:
        """Delete the session (by default only one this optimizer created, not one it attached to),
        and close the client if this optimizer made it."""
        if self.session is not None and (not self._attached if delete is None else delete):
            self.session.delete()
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> "RemoteOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- between the two formats ----------------------------------------------------------------

    def _local_params(self) -> dict[str, np.ndarray]:
        return {name: _numpy(p) for name, p in self._names}

    @torch.no_grad()
    def _write_back(self, answer: dict[str, np.ndarray]) -> None:
        for name, p in self._names:
            p.copy_(_tensor(np.asarray(answer[name])).reshape(p.shape))

    def _group_overrides(self) -> list[dict]:
        groups = []
        for g, group in enumerate(self.param_groups):
            overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                         if k not in ("params", "param_names") and self.defaults.get(k, object()) != v}
            if overrides:
                groups.append({"params": [_name(group, g, i) for i in range(len(group["params"]))], **overrides})
        return groups

    def _torch_groups(self) -> list[dict]:
        """param_groups exactly as the local torch optimizer of this kind writes them."""
        groups = []
        for group in self.param_groups:
            hp = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            if "square_avg_init" in hp and hp["square_avg_init"] == "zero":
                hp.pop("square_avg_init")  # torch's only form
            local = {"params": [torch.empty(0, 0)], **hp}  # 2-D: Muon refuses anything else
            groups.append(local)
        if self.kind in TORCH_CLASSES:
            template = TORCH_CLASSES[self.kind](groups).state_dict()["param_groups"]
        else:  # beyond torch.optim (yogi): torch's layout, this optimizer's hyperparameters
            template = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        index = 0
        for out, group in zip(template, self.param_groups):
            out["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            if "param_names" in group:
                out["param_names"] = list(group["param_names"])
        return template

    def _checkpoint_from_torch(self, state_dict: dict[str, Any]) -> dict:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the state_dict's param groups do not match this optimizer's: "
                             f"{[len(g['params']) for g in groups]} parameters per group, this optimizer has "
                             f"{[len(g['params']) for g in self.param_groups]}")
        current = self.session.state()
        template = _per_tensor(current["state"]["buffers"], self.session.layout)
        hp = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k not in _NOT_HYPERPARAMETERS}
              for g in groups]
        optimizer = {**current["optimizer"], **{k: v for k, v in hp[0].items() if k in current["optimizer"]}}
        overrides = []
        for g, group_hp in enumerate(hp[1:], start=1):
            diff = {k: v for k, v in group_hp.items() if k in optimizer and optimizer[k] != v}
            if diff:
                names = [_name(self.param_groups[g], g, i) for i in range(len(self.param_groups[g]["params"]))]
                overrides.append({"params": names, **diff})
        saved = state_dict["state"]
        order = [i for group in groups for i in group["params"]]
        steps, buffers = {}, {}
        for index, (name, p) in zip(order, self._names):
            entry = saved.get(index, {})
            expected = template[name]
            unknown = set(entry) - set(expected) - {"step"}
            if unknown:
                raise ValueError(f"the state of parameter {name} holds {sorted(unknown)}, which a {self.kind} "
                                 f"session with these hyperparameters does not keep ({sorted(expected)})")
            steps[name] = int(entry["step"]) if "step" in entry else int(bool(entry))
            # a parameter torch has no state for yet (never updated) starts as the server makes it: no buffers
            buffers[name] = {k: _wire.to_b64(np.asarray(_numpy(entry[k].float() if entry[k].dtype in
                                                                              (torch.float16, torch.bfloat16) else entry[k]),
                                                                       _wire.DTYPES[self._dtype], order="C"))
                             for k in expected if k in entry}
        step = max(steps.values(), default=0)
        checkpoint = {**{k: v for k, v in current.items() if k not in ("optimizer", "param_groups", "state")},
                      "optimizer": optimizer, "param_groups": overrides,
                      "state": {"step": step, "buffers": buffers}}
        if any(t != step for t in steps.values()):
            checkpoint["state"]["tensor_steps"] = steps
        return checkpoint


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as numpy (bfloat16 as ml_dtypes', which numpy has no own of)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(_wire.np_dtype("bfloat16"))
    return t.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _name(group: dict, g: int, i: int) -> str:
    """A tensor's name on the server: its module name where torch has one (``named_parameters()``),
    else its place, group and index (``0.3``)."""
    names = group.get("param_names")
    return names[i] if names else f"{g}.{i}"


def _per_tensor(buffers, layout) -> dict[str, dict]:
    return buffers if layout.named else {"": buffers}


def _scalar(loss) -> float | None:
    if isinstance(loss, torch.Tensor):
        return float(loss) if loss.numel() == 1 else None
    return float(loss) if isinstance(loss, (int, float)) else None
