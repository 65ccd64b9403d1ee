"""The noisy weights' small tensors, views of one buffer, are handed out
again from one training forward to the next (ops.SharedLayout, reuse):
only when nothing else holds them or their memory, never changing a
number, and never with a training forward's autograd history in a forward
under no_grad. (A graph kept with retain_graph: test_scratch.py.)"""
import copy
import weakref

import pytest
import torch

import diffq_c
from diffq_c import ops


def _net():
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])


def _setup(model, group_size=8):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_c.DiffQuantizer(model, min_size=0.0, group_size=group_size)
    q.setup_optimizer(opt)
    with torch.no_grad():
        for qp in q._qparams:
            qp.logit.uniform_(-3.0, 3.0)
    return q, opt


def _weights_seen(model):
    """Weak references to what the first layer's forward saw as its weight."""
    seen = []
    model[0].register_forward_hook(lambda mod, inputs, output: seen.append(weakref.ref(mod.weight)))
    return seen


def _train(model, q, opt, steps):
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(4, 8)).square().mean() + 1e-3 * q.model_size()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("group_size", [8, 1])
def test_reused_views_give_the_same_training(monkeypatch, group_size):
    torch.manual_seed(0)
    base = _net()
    runs = []
    for reuse in (True, False):
        monkeypatch.setattr(ops, "REUSE_VIEWS", reuse)
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        q, opt = _setup(model, group_size)
        seen = _weights_seen(model)
        runs.append(_train(model, q, opt, 4))
        alive = [r() for r in seen]
        if reuse:  # one tensor, handed out at every step
            assert all(t is alive[0] for t in alive)
        else:  # each step's own, gone with its graph
            assert all(t is None for t in alive)
    for step_a, step_b in zip(runs[0][0], runs[1][0]):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep", ["itself", "view", "transpose"])
def test_a_kept_noisy_weight_is_never_written_over(keep):
    torch.manual_seed(0)
    model = _net()
    q, opt = _setup(model)
    kept = []
    take = {"itself": lambda w: w, "view": lambda w: w.view(-1), "transpose": lambda w: w.t()}[keep]
    handle = model[0].register_forward_hook(lambda mod, inputs, output: kept.append(take(mod.weight)))
    _train(model, q, opt, 1)
    handle.remove()
    values = kept[0].detach().clone()
    seen = _weights_seen(model)
    _train(model, q, opt, 2)
    assert torch.equal(kept[0], values)
    assert all(r() is not kept[0] for r in seen)


def test_a_forward_under_no_grad_gets_no_training_history():
    torch.manual_seed(0)
    model = _net()
    q, opt = _setup(model)
    _train(model, q, opt, 2)
    flags = []
    model[0].register_forward_hook(
        lambda mod, inputs, output: flags.append((mod.weight.requires_grad, mod.weight.grad_fn)))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))
    assert flags == [(False, None), (False, None)]
    _train(model, q, opt, 1)  # and training after it still learns
    assert all(p.grad is not None for p in model.parameters())


def test_without_the_counts_or_with_reuse_buffers_off_every_step_is_fresh(monkeypatch):
    for switch in ("counts", "reuse_buffers"):
        torch.manual_seed(0)
        model = _net()
        q, opt = _setup(model)
        with monkeypatch.context() as m:
            if switch == "counts":
                def no_counts(t):
                    raise AttributeError("no use count in this torch")
                m.setattr(ops, "_storage_holders", no_counts)
            else:
                _train(model, q, opt, 1)  # a plan with kept views first
                q.reuse_buffers = False
                assert getattr(q, "_plan", None) is None
            seen = _weights_seen(model)
            _train(model, q, opt, 3)
            assert all(r() is None for r in seen)


def test_copies_start_with_nothing_kept():
    import pickle
    torch.manual_seed(0)
    model = _net()
    q, opt = _setup(model)
    _train(model, q, opt, 2)
    layout = q._plan.layouts.noisy
    assert layout._kept  # the training forward's views, with their autograd history
    twin = copy.deepcopy({"model": model, "q": q})
    assert twin["q"]._plan.layouts.noisy._kept == {}
    assert pickle.loads(pickle.dumps(layout))._kept == {}
    assert layout._kept  # the original keeps its own
