"""optim_client.torch.RemoteOptimizer trains a small model to the same weights as local torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch

from optim_client.torch import RemoteOptimizer

CASES = [
    ("adam", torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.005, "centered": True}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.01}),
    ("adamax", torch.optim.Adamax, {"lr": 0.01, "weight_decay": 0.01}),
    ("nadam", torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.01, "decoupled_weight_decay": True}),
    ("radam", torch.optim.RAdam, {"lr": 0.01}),
    ("adadelta", torch.optim.Adadelta, {"lr": 0.5}),
    ("rprop", torch.optim.Rprop, {"lr": 0.01}),
    ("asgd", torch.optim.ASGD, {"lr": 0.05, "t0": 3}),
    ("adafactor", torch.optim.Adafactor, {"lr": 0.05}),
    ("muon", torch.optim.Muon, {"lr": 0.02}),
]


def tolerance(kind: str, dtype=torch.float64, steps: int = 30, lr: float = 0.02) -> dict:
    """float tolerances; Muon's a bfloat16 step of its update per step (tests/test_parity_torch.py),
    its matrices here at most 8 rows to a column (lr scaled by √8)."""
    if kind == "muon":
        return dict(rtol=0, atol=steps * lr * 8**0.5 * 2.0**-8)
    return dict(rtol=1e-7, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def model_and_data(dtype=torch.float64, kind: str | None = None):
    """A small MLP; for Muon, which takes matrices only, without biases."""
    torch.manual_seed(0)
    bias = kind != "muon"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1, bias=bias)).to(dtype)
    x = torch.randn(32, 4, dtype=dtype)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin()
    return model, x, y


def train(model, opt, x, y, steps: int, closure: bool = False):
    for _ in range(steps):
        def compute():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(compute)
        else:
            compute()
            opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,local_cls,hp", CASES, ids=[c[0] for c in CASES])
def test_remote_training_equals_local(server, kind, local_cls, hp, dtype):
    local, x, y = model_and_data(dtype, kind)
    remote = copy.deepcopy(local)
    train(local, local_cls(local.parameters(), **hp), x, y, 30)
    opt = RemoteOptimizer(remote.parameters(), server.url, optimizer=kind, **hp)
    train(remote, opt, x, y, 30)
    for a, b in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(b, a, **tolerance(kind, dtype))
    assert opt.session.step_count == 30


def test_param_groups_and_closures(server):
    local, x, y = model_and_data()
    remote = copy.deepcopy(local)

    def groups(model):
        return [{"params": model[0].parameters(), "lr": 0.05}, {"params": model[2].parameters()}]

    train(local, torch.optim.Adam(groups(local), lr=0.01), x, y, 20, closure=True)
    opt = RemoteOptimizer(groups(remote), server.url, optimizer="adam", lr=0.01)
    train(remote, opt, x, y, 20, closure=True)
    for a, b in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)
    assert opt.session.metadata["param_groups"][0]["lr"] == 0.05


def test_state_dict_round_trip_resumes_exactly(server):
    straight, x, y = model_and_data()
    resumed = copy.deepcopy(straight)
    opt = RemoteOptimizer(straight.parameters(), server.url, optimizer="adam", lr=0.02)
    train(straight, opt, x, y, 10)

    opt2 = RemoteOptimizer(resumed.parameters(), server.url, optimizer="adam", lr=0.02)
    train(resumed, opt2, x, y, 5)
    saved = {"model": copy.deepcopy(resumed.state_dict()), "opt": opt2.state_dict()}
    fresh, _, _ = model_and_data()
    fresh.load_state_dict(saved["model"])
    opt3 = RemoteOptimizer(fresh.parameters(), server.url, optimizer="adam", lr=0.02)
    opt3.load_state_dict(saved["opt"])
    assert opt3.session.step_count == 5
    train(fresh, opt3, x, y, 5)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)


def test_refuses_what_it_cannot_do_faithfully(server):
    model, x, y = model_and_data()
    opt = RemoteOptimizer(model.parameters(), server.url, optimizer="sgd", lr=0.1)
    before = [p.clone() for p in model.parameters()]
    opt.step()  # no parameter has a gradient: torch steps nothing, and so does the server
    assert opt.session.step_count == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, x, y, 1)
    scheduler.step()
    with pytest.raises(RuntimeError, match="schedule="):
        train(model, opt, x, y, 1)
    with pytest.raises(ValueError, match="share one floating dtype"):
        RemoteOptimizer([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)],
                        server.url)
    with pytest.raises(ValueError, match="param groups are fixed"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)]})


def train_freezing(model, opt, x, y, steps: int, offset: int = 0):
    """Training in which the last layer's bias has no gradient every third step (frozen, as torch
    leaves a parameter whose .grad is None)."""
    bias = model[2].bias if model[2].bias is not None else model[2].weight
    for t in range(offset, offset + steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t % 3 == 1:
            bias.grad = None
        opt.step()


@pytest.mark.parametrize("kind,local_cls,hp", CASES, ids=[c[0] for c in CASES])
def test_frozen_parameters_are_skipped_as_torch_skips_them(server, kind, local_cls, hp):
    local, x, y = model_and_data(kind=kind)
    remote = copy.deepcopy(local)
    train_freezing(local, local_cls(local.parameters(), **hp), x, y, 10)
    with RemoteOptimizer(remote.named_parameters(), server.url, optimizer=kind, **hp) as opt:
        train_freezing(remote, opt, x, y, 10)
        assert opt.session.step_count == 10
        for a, b in zip(local.parameters(), remote.parameters()):
            torch.testing.assert_close(b, a, **tolerance(kind))


@pytest.mark.parametrize("kind,local_cls,hp", CASES, ids=[c[0] for c in CASES])
def test_a_run_moves_between_local_torch_and_the_service_both_ways(server, kind, local_cls, hp):
    """state_dict() is torch's: a local run continues remotely, a remote run continues locally, and
    each gives the weights of the run that never moved (with a parameter that skipped steps)."""
    straight, x, y = model_and_data(kind=kind)
    moved = copy.deepcopy(straight)
    straight_opt = local_cls(straight.parameters(), **hp)
    train_freezing(straight, straight_opt, x, y, 7)
    train_freezing(moved, local_cls(moved.parameters(), **hp), x, y, 7)

    # local → remote
    local_state = local_cls(moved.parameters(), **hp)
    local_state.load_state_dict(copy.deepcopy(straight_opt.state_dict()))
    remote = RemoteOptimizer(moved.named_parameters(), server.url, optimizer=kind, **hp)
    remote.load_state_dict(local_state.state_dict())
    train_freezing(straight, straight_opt, x, y, 5, offset=7)
    train_freezing(moved, remote, x, y, 5, offset=7)
    for a, b in zip(straight.parameters(), moved.parameters()):
        torch.testing.assert_close(b, a, **tolerance(kind))

    # remote → local
    back = local_cls(moved.parameters(), **hp)
    back.load_state_dict(remote.state_dict())
    remote.close()
    train_freezing(straight, straight_opt, x, y, 5, offset=12)
    train_freezing(moved, back, x, y, 5, offset=12)
    for a, b in zip(straight.parameters(), moved.parameters()):
        torch.testing.assert_close(b, a, **tolerance(kind))


def test_named_parameters_close_and_attach(server):
    import httpx

    model, x, y = model_and_data()
    with RemoteOptimizer(model.named_parameters(), server.url, optimizer="adam", lr=0.01) as opt:
        assert set(opt.session.layout.names) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        train(model, opt, x, y, 3)
        sid = opt.session.id
        # another process picks the session up: its parameters become the server's
        other, _, _ = model_and_data()
        attached = RemoteOptimizer.attach(sid, other.named_parameters(), server.url)
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b)
        train(other, attached, x, y, 2)
        assert attached.session.step_count == 5
        attached.close()  # an attached session is not deleted
        assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 404  # leaving the block deleted it
    with pytest.raises(ValueError, match="holds float64 tensors"):
        RemoteOptimizer.attach(RemoteOptimizer(torch.nn.Linear(2, 1).double().named_parameters(),
                                               server.url).session.id, model.named_parameters(), server.url)
