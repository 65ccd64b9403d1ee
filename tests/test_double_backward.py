"""Second derivatives: a backward under create_graph=True (a gradient
penalty, a Hessian-vector product, MAML) through every autograd node the
quantizers add. diffq builds its noisy weights, sizes and LSQ values from
torch operators, so such a backward works there; the kernels' gradients
carry no history, so these nodes recompute theirs with torch operators
then (ops.torch_grads). Before that, the weights' gradients came
back without history and a penalty on them was silently dropped."""
import copy

import pytest
import torch

import diffq  # the oracle: these tests must fail, not skip, without it
import diffq_c
from diffq_c import _C, ops

NOISE_KINDS = {"uniform": 0, "gaussian": 1}


def net():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def grad_norm_then_second(loss, params):
    """(first derivatives with history, second: d/dparams of the sum of
    the squared first ones)."""
    first = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum((g * g).sum() for g in first)
    second = torch.autograd.grad(penalty, params, allow_unused=True)
    return first, second


def reference_noisy(p, logit, group_size, kind, prm, seed, index):
    """diffq's formula in torch operators on the noise the kernels drew
    for parameter `index` of a forward seeded with `seed`."""
    noise = torch.empty(p.numel())
    _C.noise_fill(noise, NOISE_KINDS[kind], _C.derive_seed(seed, index), 0, 1)
    rows = p.reshape(-1, p.numel() if group_size == 0 else group_size)
    step = 1 / (2 ** ops.bits_from_logit(logit.reshape(-1, 1), prm) - 1)
    return (rows + (rows.max() - rows.min()) * step * noise.view(rows.shape)).view_as(p)


@pytest.mark.parametrize("group_size", [8, 1, 0])
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("with_size", [False, True])
def test_diffq_second_derivatives_match_torch_autograd(monkeypatch, group_size, noise, with_size):
    torch.manual_seed(0)
    model = net()
    quantizer = diffq_c.DiffQuantizer(model, group_size=group_size, min_size=0, noise=noise)
    quantizer.no_optimizer()
    seeds = []
    draw = ops.draw_seed
    monkeypatch.setattr(ops, "draw_seed", lambda *a, **k: seeds.append(draw(*a, **k)) or seeds[-1])
    x = torch.randn(5, 16)
    params = [p for p in model.parameters()]
    loss = (model(x) ** 2).sum() + (quantizer.model_size() if with_size else 0)
    first, second = grad_norm_then_second(loss, params)
    assert all(g.requires_grad for g in first)
    assert len(seeds) == 1

    # the same with the noisy weights built in torch from the same noise
    noisy = {}
    for index, qparam in enumerate(quantizer._qparams):
        noisy[qparam.module, qparam.name] = reference_noisy(qparam.param, qparam.logit, group_size, noise,
                                                            quantizer._bits_param, seeds[0], index)
    twin = copy.deepcopy(model)
    for (module, name), value in noisy.items():
        index = list(model.modules()).index(module)
        del list(twin.modules())[index]._parameters[name]
        setattr(list(twin.modules())[index], name, value)
    reference_loss = (twin(x) ** 2).sum()
    if with_size:
        reference_loss = reference_loss + quantizer.model_size()
    reference_first, reference_second = grad_norm_then_second(reference_loss, params)
    for name, got, want in zip(("first", "second"), (first, second), (reference_first, reference_second)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.detach().abs().max()), msg=name)
    # and the first derivatives are those of a plain backward
    torch.manual_seed(1)
    for p in params:
        p.grad = None
    seeds.clear()
    loss = (model(x) ** 2).sum() + (quantizer.model_size() if with_size else 0)
    loss.backward()
    torch.manual_seed(1)
    seeds.clear()
    loss = (model(x) ** 2).sum() + (quantizer.model_size() if with_size else 0)
    again = torch.autograd.grad(loss, params, create_graph=True)
    for p, g in zip(params, again):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))


def test_gradient_penalty_reaches_the_weights():
    """loss + |d loss / d weight|^2, backward once: the penalty's part of
    the weights' gradient is there (it was silently missing)."""
    torch.manual_seed(0)
    model = net()
    quantizer = diffq_c.DiffQuantizer(model, group_size=8, min_size=0)
    quantizer.no_optimizer()
    x = torch.randn(5, 16)
    weight = model[0].weight

    def total(penalty_weight):
        torch.manual_seed(1)
        loss = (model(x) ** 2).sum()
        grad, = torch.autograd.grad(loss, weight, create_graph=True)
        return loss + penalty_weight * (grad ** 2).sum()

    plain, = torch.autograd.grad(total(0.0), weight)
    penalized, = torch.autograd.grad(total(1.0), weight)
    assert (penalized - plain).abs().max() > 1e-3 * plain.abs().max()


def test_frozen_weight_gets_no_gradient_its_logit_does():
    torch.manual_seed(0)
    model = net()
    model[0].weight.requires_grad_(False)
    quantizer = diffq_c.DiffQuantizer(model, group_size=8, min_size=0)
    quantizer.no_optimizer()
    logit = quantizer._qparams[0].logit
    assert quantizer._qparams[0].param is model[0].weight
    loss = (model(torch.randn(5, 16)) ** 2).sum()
    grad, = torch.autograd.grad(loss, logit, create_graph=True)
    assert grad.requires_grad
    second, = torch.autograd.grad(grad.sum(), logit)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_model_size_second_derivative_matches_diffq():
    """The size penalty alone (no training forward before it) is the same
    function of the logits as diffq's: so are its first and second
    derivatives."""
    results = []
    for lib in (diffq, diffq_c):
        torch.manual_seed(0)
        model = net()
        quantizer = lib.DiffQuantizer(model, group_size=4, min_size=0)
        quantizer.no_optimizer()
        logits = [qp.logit for qp in quantizer._qparams]
        with torch.no_grad():
            for logit in logits:
                logit.normal_()
        results.append(grad_norm_then_second(quantizer.model_size(), logits))
    (theirs_first, theirs_second), (ours_first, ours_second) = results
    for got, want in zip(ours_first + ours_second, theirs_first + theirs_second):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_second_derivatives_match_diffq(bits):
    results = []
    for lib in (diffq, diffq_c):
        torch.manual_seed(0)
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        lib.LSQ(model, bits=bits, min_size=0).setup_optimizer(optimizer)
        params = list(model.parameters())  # the scales too
        loss = (model(torch.randn(5, 16)) ** 2).sum()
        results.append(grad_norm_then_second(loss, params))
    (theirs_first, theirs_second), (ours_first, ours_second) = results
    for got, want in zip(ours_first, theirs_first):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours_second, theirs_second):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("quantizer_name", ["DiffQuantizer", "LSQ"])
def test_batched_gradients_match_one_by_one(quantizer_name):
    """torch.autograd.grad(..., is_grads_batched=True) runs backward under
    vmap, whose gradients have no memory the kernels could read: the nodes
    then take torch operators (diffq works there too). The rows equal one
    ordinary backward per basis vector through the kernels, on the same
    graph and so the same noise."""
    torch.manual_seed(0)
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if quantizer_name == "DiffQuantizer":
        quantizer = diffq_c.DiffQuantizer(model, group_size=8, min_size=0)
    else:
        quantizer = diffq_c.LSQ(model, bits=4, min_size=0)
    quantizer.setup_optimizer(optimizer)
    params = list(model.parameters())
    out = model(torch.randn(5, 16)).reshape(-1)[:3]
    if quantizer_name == "DiffQuantizer":
        out = torch.cat([out, quantizer.model_size().reshape(1)])
    basis = torch.eye(len(out))
    batched = torch.autograd.grad(out, params, basis, is_grads_batched=True, retain_graph=True,
                                  allow_unused=True)
    for k in range(len(out)):
        single = torch.autograd.grad(out, params, basis[k], retain_graph=True, allow_unused=True)
        for rows, one in zip(batched, single):
            if one is None:
                assert rows is None or not rows[k].any()
            else:
                # a scale's gradient is a sum of many terms: its order moves it by 1e-5
                torch.testing.assert_close(rows[k], one, rtol=1e-4, atol=1e-6 * float(one.abs().max()))


# ---------------------------------------------------------------- torch.func


def test_func_grad_through_a_training_forward():
    """torch.func.grad of a training forward (diffq works there): inside the
    transform fresh tensors have no memory for the kernels, so the noisy
    weights take diffq's formula in torch operators. f(x) = sum(W~ x + b)
    has the gradient W~'s column sums, which uniform noise keeps within
    range * step / 2 a weight of W's, and off them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 32)
    quantizer = diffq_c.DiffQuantizer(model, group_size=8, min_size=0, noise="uniform")
    quantizer.no_optimizer()
    x = torch.randn(16)
    got = torch.func.grad(lambda x: model(x).sum())(x)
    weight = model.weight.detach()
    steps = (weight.max() - weight.min()) / (2 ** quantizer._get_bits(quantizer._qparams[0].logit) - 1)
    bound = (steps.detach().repeat_interleave(8).view(32, 16) / 2).sum(0)
    gap = (got - weight.sum(0)).abs()
    assert (gap <= bound * (1 + 1e-5)).all() and gap.max() > 0.01 * bound.max()
    # model_size inside a transform: its value as outside
    size, value = torch.func.grad_and_value(lambda x: quantizer.model_size() + 0 * x.sum())(x)
    assert not size.any() and float(value.detach()) == pytest.approx(float(quantizer.model_size().detach()), rel=1e-6)
    # and the kernels again once out of it
    assert model(x).requires_grad


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_func_transforms_through_lsq_match_autograd(transform):
    torch.manual_seed(0)
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diffq_c.LSQ(model, bits=4, min_size=0).setup_optimizer(optimizer)
    x = torch.randn(1, 16, requires_grad=True)
    if transform == "grad":
        got = torch.func.grad(lambda x: (model(x) ** 2).sum())(x)
        want, = torch.autograd.grad((model(x) ** 2).sum(), x)
    else:
        got = torch.func.jacrev(model)(x)
        want = torch.autograd.functional.jacobian(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
