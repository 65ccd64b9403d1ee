"""model_size() after a training forward adds its gradient to the logits in
the noisy groups' backward (ops.SizeLink, ops.FUSE_SIZE_GRAD): one gradient a
logit tensor instead of two that autograd adds. These tests hold the linked
path to the unlinked one (gradients bit for bit where the arithmetic is the
same), in every order a user may call forward, model_size() and backward,
and check when the link must not be taken. Then the training forward's
plan (made once, its buffers handed to the binding as they are, remade when
a parameter changes layout, dtype or shape) and its shared allocations."""
import copy
import pickle

import pytest
import torch
from torch import nn

from diffq_c import ops
from test_op_layer import _quantized


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _setup(seed=0, group_size=8, **kwargs):
    model = _model(seed)
    quantizer, opt = _quantized(model, group_size, **kwargs)
    return model, quantizer, opt


def _step_grads(fuse, order, monkeypatch, group_size=8, penalty=1e-2, **kwargs):
    """Gradients of every parameter (weights and logits) after one step done
    in `order`, with the link on or off."""
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", fuse)
    model, quantizer, _ = _setup(group_size=group_size, **kwargs)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    if order == "together":
        (model(x).square().sum() + penalty * quantizer.model_size()).backward()
    elif order == "size first":
        out = model(x)
        (penalty * quantizer.model_size()).backward()
        out.square().sum().backward()
    elif order == "size last":
        out = model(x)
        size = quantizer.model_size()
        out.square().sum().backward()
        (penalty * size).backward()
    elif order == "size before forward":
        size = quantizer.model_size()
        (model(x).square().sum() + penalty * size).backward()
    else:
        raise AssertionError(order)
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("order", ["together", "size first", "size last", "size before forward"])
@pytest.mark.parametrize("group_size", [1, 8, 0])
def test_linked_gradients_equal_unlinked(monkeypatch, order, group_size):
    off = _step_grads(False, order, monkeypatch, group_size)
    on = _step_grads(True, order, monkeypatch, group_size)
    assert len(on) == len(off)
    for a, b in zip(off, on):
        assert a is not None and b is not None
        # the same float32 products and one float32 addition either way
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(noise="uniform"), dict(param="noise")])
def test_linked_gradients_equal_unlinked_in_other_modes(monkeypatch, kwargs):
    off = _step_grads(False, "together", monkeypatch, **kwargs)
    on = _step_grads(True, "together", monkeypatch, **kwargs)
    for a, b in zip(off, on):
        assert torch.equal(a, b)


def test_the_link_is_taken_after_a_forward_and_not_otherwise(monkeypatch):
    model, quantizer, opt = _setup()
    calls = []
    real = ops._SizeThroughGroups.apply
    monkeypatch.setattr(ops._SizeThroughGroups, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 16)
    quantizer.model_size()
    assert calls == [], "no forward yet"
    out = model(x)
    quantizer.model_size()
    assert calls == [1], "after a training forward"
    with torch.no_grad():
        quantizer.model_size()
    assert calls == [1], "no gradient wanted"
    (out.sum() + quantizer.model_size()).backward()
    with torch.no_grad():
        quantizer._qparams[1].logit.add_(0.5)
    quantizer.model_size()
    assert calls == [1, 1], "a logit changed since the forward"
    model(x)
    logit = quantizer._qparams[0].logit
    logit.data = logit.data.clone()
    quantizer.model_size()
    assert calls == [1, 1], "a logit's .data was assigned since the forward"
    with torch.no_grad():
        model(x)
    quantizer.model_size()
    assert calls == [1, 1], "a forward without gradients has no nodes to go through"
    model.eval()
    model(x)
    model.train()
    model(x)
    quantizer.model_size()
    assert calls == [1, 1, 1]
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", False)
    model(x)
    quantizer.model_size()
    assert calls == [1, 1, 1], "switched off"


def test_size_after_an_optimizer_step_equals_unlinked(monkeypatch):
    """Fused optimizers change the logits without bumping their version
    counters, so the link may be taken after a step: the size and its
    gradient are both of the logits as they are then, as without it."""
    grads = {}
    for fuse in (False, True):
        monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", fuse)
        model, quantizer, opt = _setup()
        torch.manual_seed(3)
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        size = quantizer.model_size()
        size.backward()
        grads[fuse] = (float(size.detach()), [qp.logit.grad.clone() for qp in quantizer._qparams])
    assert grads[False][0] == grads[True][0]
    for a, b in zip(grads[False][1], grads[True][1]):
        assert torch.equal(a, b)


def test_frozen_logits_are_not_linked():
    model, quantizer, _ = _setup()
    for qp in quantizer._qparams:
        qp.logit.requires_grad_(False)
    model(torch.randn(4, 16))
    size = quantizer.model_size()
    assert not size.requires_grad  # as without the link: nothing to differentiate


def test_each_logit_gets_one_gradient_from_one_node(monkeypatch):
    """The point of the link: the logits' AccumulateGrad receives one
    gradient (no addition by the engine)."""
    model, quantizer, _ = _setup()
    logit = quantizer._qparams[0].logit
    seen = []
    logit.register_hook(lambda g: seen.append(g.clone()))
    (model(torch.randn(4, 16)).sum() + quantizer.model_size()).backward()
    assert len(seen) == 1
    assert torch.equal(seen[0], logit.grad)


def test_an_in_place_change_before_backward_is_refused(monkeypatch):
    for fuse in (False, True):
        monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", fuse)
        model, quantizer, _ = _setup()
        loss = model(torch.randn(4, 16)).sum() + quantizer.model_size()
        with torch.no_grad():
            quantizer._qparams[0].param.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        model, quantizer, _ = _setup()
        loss = model(torch.randn(4, 16)).sum() + quantizer.model_size()
        with torch.no_grad():
            quantizer._qparams[-1].logit.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_model_size_twice_in_one_loss(monkeypatch):
    grads = {}
    for fuse in (False, True):
        monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", fuse)
        model, quantizer, _ = _setup()
        torch.manual_seed(3)
        out = model(torch.randn(4, 16))
        (out.sum() + quantizer.model_size() + 2 * quantizer.model_size()).backward()
        grads[fuse] = [qp.logit.grad.clone() for qp in quantizer._qparams]
    for a, b in zip(grads[False], grads[True]):
        # the two scales are added before the product here, after it there
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_size_alone_through_autograd_grad(monkeypatch):
    model, quantizer, _ = _setup()
    model(torch.randn(4, 16))
    logits = [qp.logit for qp in quantizer._qparams]
    linked = torch.autograd.grad(quantizer.model_size(), logits)
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", False)
    model(torch.randn(4, 16))
    plain = torch.autograd.grad(quantizer.model_size(), logits)
    for a, b in zip(plain, linked):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_a_quantizer_with_a_live_link_copies_and_pickles():
    model, quantizer, _ = _setup()
    out = model(torch.randn(4, 16))
    assert quantizer._link().handles is not None
    clone = copy.deepcopy(model)
    assert len(list(clone.parameters())) == len(list(model.parameters()))
    copied = copy.deepcopy(quantizer)
    assert copied._link().handles is None
    pickle.loads(pickle.dumps(quantizer._link()))
    out.sum().backward()


# ------------------------------------------------ the training forward's plan


def _noisy_after(model, quantizer, x, seed):
    model.zero_grad(set_to_none=True)
    for qp in quantizer._qparams:
        qp.logit.grad = None
    torch.manual_seed(seed)
    model(x).sum().backward()
    return [qp.logit.grad.clone() for qp in quantizer._qparams]


def test_a_parameter_turned_non_contiguous_mid_training_is_seen(monkeypatch):
    """The plan hands parameters to the binding as they are; after one
    becomes non-contiguous the binding refuses, nothing is written, and the
    forward goes the careful way with the same seed: the same gradients as
    a quantizer that never had a plan."""
    x = torch.randn(4, 16)
    model_a, quantizer_a, _ = _setup()
    model_b, quantizer_b, _ = _setup()
    _noisy_after(model_a, quantizer_a, x, 1)  # a plan is made with contiguous weights
    refusals = []
    real = ops.noise_forward_all

    def spy(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except ops.KernelRefused:
            refusals.append(1)
            raise
    monkeypatch.setattr(ops, "noise_forward_all", spy)
    for model in (model_a, model_b):
        weight = model[2].weight
        weight.data = weight.data.t().contiguous().t()
        assert not weight.is_contiguous()
    quantizer_b._plan = None
    grads_a = _noisy_after(model_a, quantizer_a, x, 2)
    assert refusals == [1]
    grads_b = _noisy_after(model_b, quantizer_b, x, 2)
    assert refusals == [1], "a plan made with the layout in view does not try as they are"
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    assert all(p.grad is not None for p in model_a.parameters())


def test_a_parameter_leaving_and_rejoining_the_kernels(monkeypatch):
    model, quantizer, _ = _setup()
    x = torch.randn(4, 16)
    model(x).sum().backward()
    weight = model[0].weight
    weight.data = weight.data.double()
    model[0].bias.data = model[0].bias.data.double()
    plan = quantizer._train_plan()
    assert plan.torch_qps == [], "the plan is not looked at before a forward"
    with pytest.raises(RuntimeError):
        model(x)  # float32 input into a float64 layer: torch's own error, no crash
    assert any(qp.param is weight for qp in quantizer._train_plan().torch_qps)
    weight.data = weight.data.float()
    model[0].bias.data = model[0].bias.data.float()
    model(x).sum().backward()
    assert quantizer._train_plan().torch_qps == []
    assert quantizer._link().handles is not None


def test_shared_layout_gives_each_shape_its_own_memory():
    kept = []

    def lender(shape):
        kept.append(shape)
        return torch.empty(shape)
    shapes = [(16, 16), (16,), (), (3, 4, 5), (16, 16), (0, 4), (200, 100), (7,), (3, 4, 5)]
    allocs = [ops._empty_f32] * len(shapes)
    allocs[7] = lender
    tensors = ops.SharedLayout(shapes, allocs).allocate()
    assert [tuple(t.shape) for t in tensors] == shapes
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    assert kept == [(7,)], "an allocator of its own is used"
    spans = sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel()) for t in tensors if t.numel())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "no two overlap"
    # the small ones of one trailing shape share an allocation
    assert tensors[0].untyped_storage().data_ptr() == tensors[4].untyped_storage().data_ptr()
    assert tensors[6].untyped_storage().nbytes() == 200 * 100 * 4, "a large one stands alone"
    # empty tensors only: a shared buffer of no values still gives their views
    assert [tuple(t.shape) for t in ops.SharedLayout([(0, 4), (0,)]).allocate()] == [(0, 4), (0,)]


def test_a_parameter_reshaped_mid_training_gets_noisy_weights_of_its_shape():
    model, quantizer, _ = _setup()
    x = torch.randn(4, 16)
    model(x).sum().backward()
    weight = model[2].weight
    seen = []
    model[2].register_forward_pre_hook(lambda module, args: seen.append(tuple(module.weight.shape)))
    # same values, same count, another shape: the plan's layout no longer fits
    weight.data = weight.data.reshape(32, 128)
    model[2].in_features = 128
    with pytest.raises(RuntimeError):
        model(x)  # torch's own shape error in the layer, after a noisy weight of the right shape
    assert seen == [(32, 128)]
    assert quantizer._train_plan().layouts.noisy.shapes[2] == (32, 128)


def test_the_size_terms_of_the_forward_are_used_while_they_hold(monkeypatch):
    """The noise forward reads the logits anyway and returns their size
    terms too: model_size() right after it calls no size kernel, and after
    an optimizer step (fused ones leave version counters alone) it does."""
    model, quantizer, opt = _setup()
    calls = []
    real = ops.size_bits_all
    monkeypatch.setattr(ops, "size_bits_all", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 16)
    out = model(x)
    linked = quantizer.model_size()
    assert calls == []
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", False)
    assert float(quantizer.model_size().detach()) == float(linked.detach())
    assert calls == [1]
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", True)
    (out.sum() + linked).backward()
    opt.step()
    after = quantizer.model_size()
    assert calls == [1, 1], "the logits may have changed: the size kernel runs"
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", False)
    assert float(quantizer.model_size().detach()) == float(after.detach())


@pytest.mark.parametrize("group_size", [1, 8])
def test_the_forward_gives_size_terms_only_while_model_size_reads_them(monkeypatch, group_size):
    """A training loop without model_size() stops paying for the size terms
    from its second forward (the binding gets no size_stats); the forward
    after the first model_size() that finds none computes them again; and
    model_size() gives the same value and gradients either way."""
    model, quantizer, opt = _setup(group_size=group_size)
    asked, sized = [], []
    real_forward, real_size = ops._C.noise_forward_multi, ops.size_bits_all

    def forward_multi(*args):
        asked.append(args[-1] is not None)
        return real_forward(*args)

    monkeypatch.setattr(ops._C, "noise_forward_multi", forward_multi, raising=False)
    monkeypatch.setattr(ops, "size_bits_all", lambda *a: sized.append(1) or real_size(*a))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))

    def step(with_size):
        opt.zero_grad()
        loss = model(x).square().sum()
        if with_size:
            loss = loss + 1e-2 * quantizer.model_size()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return loss, grads

    step(False)
    step(False)
    assert asked == [True, False], "no model_size(): the second forward skips the size terms"
    torch.manual_seed(7)
    loss, grads = step(True)
    assert asked[-1] is False and sized == [1], "model_size() computed what the forward skipped"
    step(True)
    assert asked[-1] is True and sized == [1], "read again: the forward gives them"
    # the value and gradients of a step whose forward skipped the terms
    # against the same step with the link off (size kernel apart)
    twin, twin_q, twin_opt = _setup(group_size=group_size)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    for mine, theirs in zip(quantizer._unique_qparams(), twin_q._unique_qparams()):
        theirs.logit.data.copy_(mine.logit.data)
    quantizer._link().read = False  # as after a step without model_size()
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", True)
    torch.manual_seed(9)
    opt.zero_grad()
    out = model(x).square().sum() + 1e-2 * quantizer.model_size()
    out.backward()
    assert asked[-1] is False
    monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", False)
    torch.manual_seed(9)
    twin_opt.zero_grad()
    ref = twin(x).square().sum() + 1e-2 * twin_q.model_size()
    ref.backward()
    assert float(out.detach()) == float(ref.detach())
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_linked_groups_still_update_large_gradients_in_place(monkeypatch):
    """The handle's gradient rides in the same argument tuple as the
    weights': the reference count that the in-place speed path reads must
    still find a large incoming gradient free, with the link as without it.
    In place, the weight's gradient is the incoming gradient's memory."""
    for fuse in (False, True):
        monkeypatch.setattr(ops, "FUSE_SIZE_GRAD", fuse)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512))
        quantizer, _ = _quantized(model, 8)
        incoming = []

        def watch(module, args):
            # the noisy weight stands in the module during the forward
            module.weight.register_hook(lambda g: incoming.append(g.data_ptr()))
        model[0].register_forward_pre_hook(watch)
        (model(torch.randn(5, 256)).pow(2).sum() + quantizer.model_size()).backward()
        assert quantizer._link().handles is not None or not fuse
        assert incoming == [model[0].weight.grad.data_ptr()], f"not in place with the link {fuse}"
