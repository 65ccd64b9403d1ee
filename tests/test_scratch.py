"""Memory kept between calls (diffq_c/scratch.py): lent again only when
nobody else holds it, and the quantizer's numbers are the same with it as
without it."""
import copy
import pickle

import pytest
import torch

import diffq_c
from diffq_c import scratch
from diffq_c.scratch import Scratch

pytestmark = pytest.mark.skipif(not scratch.reuse_supported(),
                                reason="this torch has no storage use count")


def test_large_memory_is_lent_again_once_released():
    pool = Scratch(keep_bytes=1024)
    a = pool.empty("w", (16, 32))
    ptr = a.data_ptr()
    assert a.shape == (16, 32) and a.dtype == torch.float32 and a.is_contiguous()
    del a
    b = pool.empty("w", (512,))  # same size, other shape
    assert b.data_ptr() == ptr and b.shape == (512,)
    assert pool.nbytes() == 512 * 4


@pytest.mark.parametrize("holder", ["tensor", "view", "detached", "slice"])
def test_memory_still_held_is_never_lent(holder):
    pool = Scratch(keep_bytes=0)
    a = pool.empty("w", (8, 8))
    a.fill_(3.0)
    held = {"tensor": lambda: a, "view": lambda: a.t(), "detached": lambda: a.detach(),
            "slice": lambda: a[2:4]}[holder]()
    del a
    b = pool.empty("w", (8, 8))
    b.fill_(-1.0)
    assert b.data_ptr() != held.untyped_storage().data_ptr()
    assert bool((held == 3.0).all())
    # one storage busy, one kept: a third call finds the second free
    del b
    c = pool.empty("w", (8, 8))
    assert c.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    assert pool.nbytes() == 2 * 64 * 4


def test_small_memory_is_kept_only_when_asked_and_let_go_on_release():
    pool = Scratch(keep_bytes=1 << 20)
    a = pool.empty("w", (10,))
    del a
    assert pool.nbytes() == 0
    a = pool.empty("w", (10,), small_too=True)
    ptr = a.data_ptr()
    del a
    b = pool.empty("w", (10,))  # kept memory is lent without small_too too
    assert b.data_ptr() == ptr
    del b
    pool.release_small()
    assert pool.nbytes() == 0


def test_at_most_per_size_storages_are_kept():
    pool = Scratch(per_size=2, keep_bytes=0)
    held = [pool.empty("w", (4,)) for _ in range(5)]
    assert len({t.data_ptr() for t in held}) == 5
    assert pool.nbytes() == 2 * 16
    assert len(pool.empty("other", (4,)).untyped_storage()) == 16  # owners are apart


def test_disabled_or_without_use_count_every_call_is_fresh(monkeypatch):
    pool = Scratch(keep_bytes=0)
    pool.enabled = False
    a = pool.empty("w", (4,))
    del a
    assert pool.nbytes() == 0
    pool.enabled = True
    monkeypatch.setattr(scratch, "_use_count", None)
    assert not scratch.reuse_supported()
    pool.empty("w", (4,))
    assert pool.nbytes() == 0


def test_copies_and_pickles_start_empty():
    pool = Scratch(per_size=3, keep_bytes=0)
    pool.empty("w", (1000,))
    pool.enabled = False
    for other in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert other.nbytes() == 0
        assert (other.per_size, other.keep_bytes, other.enabled) == (3, 0, False)


# ------------------------------------------------------------ in a quantizer


def _net():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def _quantizer(model, keep_bytes, group_size=1, reuse=True, optimizer=None):
    q = diffq_c.DiffQuantizer(model, min_size=0.0, group_size=group_size)
    if optimizer is None:
        q.no_optimizer()
    else:
        q.setup_optimizer(optimizer)
    q._scratch.keep_bytes = keep_bytes
    q.reuse_buffers = reuse
    with torch.no_grad():
        for qp in q._qparams:
            qp.logit.uniform_(-3.0, 3.0)
    return q


@pytest.mark.parametrize("group_size", [1, 8])
def test_training_with_kept_memory_matches_fresh_memory(group_size):
    """Same seeds, same steps: every gradient and size equal with the pool
    (everything kept, keep_bytes=0) and without it, over steps that release
    the gradients (zero_grad to None) and steps that keep them."""
    torch.manual_seed(0)
    base = _net()
    runs = []
    for reuse in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # the logits, the inputs and the noise seeds
        q = _quantizer(model, 0, group_size, reuse, opt)
        grads = []
        for step in range(4):
            opt.zero_grad(set_to_none=step % 2 == 0)
            x = torch.randn(16, 64)
            loss = model(x).square().mean() + 1e-3 * q.model_size()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        runs.append((grads, [p.detach().clone() for p in model.parameters()]))
        if reuse:
            assert q._scratch.nbytes() > 0
    for a, b in zip(runs[0][0], runs[1][0]):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)
    for pa, pb in zip(runs[0][1], runs[1][1]):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("keep_bytes", [0, scratch.KEEP_BYTES])
def test_retained_graph_keeps_its_noisy_weights(keep_bytes):
    """A graph kept with retain_graph holds its noisy weights: a forward in
    between must not write over them, so a second backward of the first
    graph gives the first gradients again. With keep_bytes 0 every noisy
    weight is kept memory; with the default these small ones are views of
    one buffer that the training plan hands out again (ops.SharedLayout),
    and linear's graph holds only a transpose of each."""
    torch.manual_seed(0)
    model = _net()
    q = _quantizer(model, keep_bytes)
    x = torch.randn(4, 64)
    out = model(x).sum()
    out.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 64)).sum().backward()  # new noise, new noisy weights
    model.zero_grad(set_to_none=True)
    out.backward()
    for p, g in zip(model.parameters(), first):
        assert torch.equal(p.grad, g)


def test_eval_weights_held_by_the_caller_are_not_written_over():
    torch.manual_seed(0)
    model = _net()
    twin = copy.deepcopy(model)
    q = _quantizer(model, 1 << 30)  # only eval keeps memory here
    model.eval()
    q.quantize()
    held = model[0].weight  # the Parameter, pointing at the quantized values
    kept = held.detach()
    snapshot = kept.clone()
    q.unquantize()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # new float weights, new quantized values
    q.quantize()
    assert kept.data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(kept, snapshot)
    q.unquantize()
    # released: the next evals give the same values as a quantizer keeping nothing
    del kept, held
    with torch.no_grad():
        for a, b in zip(twin.parameters(), (qp.param for qp in q._qparams)):
            a.copy_(b)
    reference = _quantizer(twin, 1 << 30, reuse=False)
    for a, b in zip(reference._qparams, q._qparams):
        a.logit.data.copy_(b.logit.data)
    twin.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), twin(x))
    assert reference._scratch.nbytes() == 0


def test_training_lets_go_of_eval_memory_and_switching_off_frees_all():
    model = _net()
    q = _quantizer(model, 1 << 30, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert q._eval_cache._values is not None  # the quantized weights, for the next eval
    model.train()
    model(torch.randn(2, 64)).sum().backward()
    assert q._eval_cache._values is None
    assert q._scratch.nbytes() == 0  # nothing here reaches keep_bytes
    q._scratch.keep_bytes = 0
    model(torch.randn(2, 64)).sum().backward()
    assert q._scratch.nbytes() > 0
    assert q.reuse_buffers
    q.reuse_buffers = False
    assert q._scratch.nbytes() == 0
    model(torch.randn(2, 64)).sum().backward()
    assert q._scratch.nbytes() == 0
