"""LSQ against the real diffq 0.2.4: constructor, scales, C forward/backward
against torch autograd of diffq's formula, training, states and sizes."""
import inspect
import warnings

import pytest
import torch

import diffq  # the oracle: these tests must fail, not skip, without it
import diffq.lsq as diffq_lsq
import diffq_c
from diffq_c import _C, ops
from diffq_c import lsq as ours_lsq
from diffq_c.utils import QuantizerConfigError


def conv_net(seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv1d(8, 32, 5), torch.nn.ReLU(),
                               torch.nn.Conv1d(32, 16, 3)).to(dtype)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def diffq_reference(x, scale, bits, dtype=torch.float32):
    """Leaf copies of x and scale in `dtype`, and diffq's own formula
    (diffq.lsq.quantize) applied to them: values and indexes, ready for
    torch autograd."""
    x = x.detach().to(dtype).requires_grad_()
    scale = scale.detach().to(dtype).requires_grad_()
    values, index = diffq_lsq.quantize(x, scale, bits)
    return x, scale, values, index


# ------------------------------------------------------------ constructor

def test_signature_and_defaults_match_diffq():
    ours = inspect.signature(diffq_c.LSQ.__init__).parameters
    theirs = inspect.signature(diffq.LSQ.__init__).parameters
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name


@pytest.mark.parametrize("bits", [0, 16, -3])
def test_bad_bits_raise_like_diffq(bits):
    with pytest.raises(AssertionError):
        diffq.LSQ(conv_net(), bits=bits)
    with pytest.raises(QuantizerConfigError) as info:
        diffq_c.LSQ(conv_net(), bits=bits)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


def test_fractional_bits_refused():
    # diffq accepts 7.5 and then computes levels on +-2^6.5; we refuse it
    with pytest.raises(QuantizerConfigError):
        diffq_c.LSQ(conv_net(), bits=7.5)


def test_applied_twice_raises():
    model = conv_net()
    diffq_c.LSQ(model, min_size=0)
    with pytest.raises(RuntimeError, match="twice"):
        diffq_c.LSQ(model, min_size=0)


@pytest.mark.parametrize("bits", [2, 8, 15])
def test_scales_registered_and_initialised_like_diffq(bits):
    theirs, ours = conv_net(), conv_net()
    diffq.LSQ(theirs, bits=bits, min_size=0, suffix="_s")
    quantizer = diffq_c.LSQ(ours, bits=bits, min_size=0, suffix="_s")
    names_theirs = [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == names_theirs
    assert "0.weight_s" in names_theirs
    for (_, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q)
    assert repr(quantizer).startswith("LSQ(") and "suffix=_s" in repr(quantizer)


# ------------------------------------------------------------ the kernels

def lsq_inputs(n, bits, seed):
    """Weights and a scale, with exact halves of the step (round half to
    even), values outside the clamp range, and values on its bounds."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 0.3
    scale = torch.tensor(2 * float(x.abs().mean()) / (2 ** (bits - 1)) ** 0.5)
    halves = (torch.randint(-40, 40, (n // 5,), generator=gen).float() + 0.5) * scale
    x[: n // 5] = halves
    x[n // 5] = 1e3
    x[n // 5 + 1] = -1e3
    x[n // 5 + 2] = (2 ** (bits - 1) - 1) * scale  # the upper bound itself
    return x, scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 15])
def test_forward_bit_identical_to_diffq(bits):
    for n, seed in ((7, 0), (1000, 1), (70001, 2)):  # 70001 spans two kernel chunks
        x, scale = lsq_inputs(n, bits, seed)
        _, _, values, index = diffq_reference(x, scale, bits)
        ours_values, ours_index = ours_lsq.quantize(x, scale, bits)
        assert torch.equal(ours_values, values.detach())
        assert torch.equal(ours_index, index.detach())
        stored = ours_lsq.lsq_indexes(x, scale, bits)
        assert stored.dtype == torch.int16 and torch.equal(stored, index.detach().short())


def test_nan_weights_give_nan_like_diffq():
    x = torch.tensor([0.1, float("nan"), -0.3, 0.0])
    scale = torch.tensor(0.05)
    _, _, values, index = diffq_reference(x, scale, 4)
    ours_values, ours_index = ours_lsq.quantize(x, scale, 4)
    assert torch.equal(ours_values.isnan(), values.isnan())
    assert torch.equal(ours_index.isnan(), index.isnan())
    keep = ~values.isnan()
    assert torch.equal(ours_values[keep], values.detach()[keep])
    assert torch.equal(ours_index[keep], index.detach()[keep])


def test_infinite_weights_clamp_like_torch():
    x = torch.tensor([float("inf"), -float("inf"), 0.1])
    scale = torch.tensor(0.05)
    _, _, values, index = diffq_reference(x, scale, 4)
    ours_values, ours_index = ours_lsq.quantize(x, scale, 4)
    assert torch.equal(ours_values, values.detach()) and torch.equal(ours_index, index.detach())


@pytest.mark.parametrize("bits", [2, 4, 8, 15])
def test_gradients_match_torch_autograd_float32(bits):
    for n, seed in ((9, 3), (5000, 4), (70001, 5)):
        x, scale = lsq_inputs(n, bits, seed)
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100))
        ref_x, ref_scale, ref_values, ref_index = diffq_reference(x, scale, bits)
        (ref_values * upstream).sum().backward()

        ours_x = x.clone().requires_grad_()
        ours_scale = scale.clone().requires_grad_()
        values = ours_lsq.quantized_values(ours_x, ours_scale, bits)
        (values * upstream).sum().backward()

        # straight-through gradient: torch gets it as (g * s) / s, within an ulp of g
        torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=0)
        # torch sums sum(g * index) and sum(g * x / s) apart in float32 and
        # subtracts them: its own error is about eps32 * sum(|g| * (|index| + |c|))
        # times the gradient scale, which can exceed rtol 1e-5 of the result
        c = (x / scale).clamp(-2 ** (bits - 1), 2 ** (bits - 1) - 1)
        grad_scale = ours_lsq._grad_scale(n, bits)
        torch_error = 4 * 2 ** -23 * grad_scale * float(
            (upstream.abs() * (ref_index.detach().abs() + c.abs())).sum())
        assert abs(float(ours_scale.grad) - float(ref_scale.grad)) <= \
            1e-5 * abs(float(ref_scale.grad)) + torch_error


BOTH_INSIDE = _C.LSQ_LOW_INSIDE | _C.LSQ_HIGH_INSIDE


def test_clamp_bounds_are_the_installed_torchs():
    """torch's clamp passed the gradient on its bounds up to 2.13 and stopped
    in 2.14 (pytorch issue 184574); diffq's LSQ gradients change with it, and
    ours follow whichever torch is installed."""
    x = torch.tensor([-3.0, 2.0], requires_grad=True)
    x.clamp(-3.0, 2.0).sum().backward()
    want = (_C.LSQ_LOW_INSIDE if x.grad[0] else 0) | (_C.LSQ_HIGH_INSIDE if x.grad[1] else 0)
    assert ours_lsq.clamp_bounds() == want
    version = ops.TORCH_RELEASE
    if version <= (2, 13):
        assert want == BOTH_INSIDE
    elif version == (2, 14):
        assert want == 0
    # the probe is the same under contexts a caller may be in
    with torch.inference_mode():
        assert ours_lsq._probe_clamp_bounds() == want
    with torch.device("meta"):
        assert ours_lsq._probe_clamp_bounds() == want
    with torch.no_grad():
        assert ours_lsq._probe_clamp_bounds() == want


def _clamp_with_bounds(c, low, high, bounds):
    """clamp(c, low, high) whose gradient passes strictly inside and on the
    bounds that `bounds` takes in: either convention in torch autograd,
    whatever the installed torch's own clamp does."""
    keep = (c >= low if bounds & _C.LSQ_LOW_INSIDE else c > low) & \
        (c <= high if bounds & _C.LSQ_HIGH_INSIDE else c < high)
    return torch.where(keep, c, c.detach().clamp(low, high))


def _on_bounds_inputs(n, bits, seed):
    """lsq_inputs with a tenth of the weights exactly on the clamp's bounds
    (c = x / effective scale equal to low or high in float32), half each."""
    x, scale = lsq_inputs(n, bits, seed)
    low, high = ours_lsq._index_range(bits)
    effective = _C.lsq_effective_scale(float(scale), ours_lsq._grad_scale(n, bits))
    candidates = torch.tensor([low, high], dtype=torch.float32) * effective
    exact = (candidates / torch.tensor(effective)) == torch.tensor([low, high], dtype=torch.float32)
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(2, n // 10)]
    x[picks[0::2]] = candidates[0]
    x[picks[1::2]] = candidates[1]
    return x, scale, bool(exact[0]), bool(exact[1])


@pytest.mark.parametrize("bounds", [0, BOTH_INSIDE, _C.LSQ_HIGH_INSIDE])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_bounds_convention_matches_autograd(monkeypatch, bits, bounds):
    """Both torch conventions (and a mixed one), whichever torch runs the
    tests: the kernels against autograd of diffq's formula with a clamp of
    that convention, on weights exactly on the bounds."""
    monkeypatch.setattr(ours_lsq, "_CLAMP_BOUNDS", bounds)
    on_low = on_high = False
    for n, seed in ((9, 13), (5000, 14), (70001, 15)):
        x, scale, low_exact, high_exact = _on_bounds_inputs(n, bits, seed)
        on_low, on_high = on_low or low_exact, on_high or high_exact
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100))
        low, high = ours_lsq._index_range(bits)
        grad_scale = ours_lsq._grad_scale(n, bits)
        ref_x, ref_scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        scaled = ref_scale * grad_scale
        effective = (ref_scale - scaled).detach() + scaled
        c = _clamp_with_bounds(ref_x / effective, low, high, bounds)
        index = c + (c.round() - c).detach()
        (index * effective * upstream).sum().backward()

        ours_x, ours_scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        (ours_lsq.quantized_values(ours_x, ours_scale, bits) * upstream).sum().backward()
        assert torch.equal(ours_x.grad == 0, ref_x.grad == 0)
        torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=0)
        torch_error = 4 * 2 ** -23 * grad_scale * float(
            (upstream.abs() * (index.detach().abs() + c.detach().abs())).sum())
        assert abs(float(ours_scale.grad) - float(ref_scale.grad)) <= \
            1e-5 * abs(float(ref_scale.grad)) + torch_error
    # the weights did sit on both bounds, so the convention was exercised
    assert on_low and on_high


@pytest.mark.parametrize("bits", [2, 5, 8, 15])
def test_scale_gradient_matches_float64_autograd(bits):
    """Where x / s is exact in float32 (s a power of two, x on a fine grid),
    autograd of diffq's formula in float64 is free of rounding and must give
    our scale gradient to rtol 1e-5."""
    scale = torch.tensor(2.0 ** -6)
    n = 3000
    # a size for which the gradient-scaling trick leaves s unchanged in float32
    while _C.lsq_effective_scale(float(scale), ours_lsq._grad_scale(n, bits)) != float(scale):
        n += 1
    gen = torch.Generator().manual_seed(bits)
    grid = torch.randint(-2 ** (bits + 6), 2 ** (bits + 6), (n,), generator=gen).float()
    x = grid * float(scale) / 32  # c = x / s = grid / 32 exactly, partly out of range
    upstream = torch.randn(n, generator=gen)

    ref_x, ref_scale, ref_values, _ = diffq_reference(x, scale, bits, dtype=torch.float64)
    (ref_values * upstream.double()).sum().backward()
    ours_x = x.clone().requires_grad_()
    ours_scale = scale.clone().requires_grad_()
    (ours_lsq.quantized_values(ours_x, ours_scale, bits) * upstream).sum().backward()

    torch.testing.assert_close(ours_scale.grad.double(), ref_scale.grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours_x.grad.double(), ref_x.grad, rtol=1e-5, atol=0)


def test_gradient_only_for_what_needs_it():
    x, scale = lsq_inputs(100, 8, 0)
    scale.requires_grad_()
    (ours_lsq.quantized_values(x, scale, 8) ** 2).sum().backward()
    assert scale.grad is not None and x.grad is None


def test_nan_weights_refused_at_quantization():
    model = torch.nn.Linear(64, 64)
    quantizer = diffq_c.LSQ(model, min_size=0)
    with torch.no_grad():
        model.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="weight"):
        quantizer.get_quantized_state()


def test_binding_validates_buffers():
    x = torch.randn(10)
    with pytest.raises(TypeError):
        _C.lsq_forward(x.double(), 0.1, 8, q=torch.empty(10))
    with pytest.raises(ValueError):
        _C.lsq_forward(x, 0.1, 0, q=torch.empty(10))
    with pytest.raises(ValueError):
        _C.lsq_forward(x, 0.1, 8, q=torch.empty(9))
    with pytest.raises(ValueError):
        _C.lsq_forward(x, 0.1, 8, q=x)  # overlap
    with pytest.raises(TypeError):
        _C.lsq_forward(x, 0.1, 8, index=torch.empty(10, dtype=torch.int32))
    with pytest.raises(ValueError):
        _C.lsq_backward(x, torch.randn(10), 0.1, 8, 0, 0.1, grad_x=x)
    with pytest.raises(ValueError):
        _C.lsq_forward(torch.randn(4, 4).t(), 0.1, 8, q=torch.empty(16))  # not contiguous


def test_reference_and_fast_kernels_agree_through_binding():
    x, scale = lsq_inputs(70001, 8, 9)
    upstream = torch.randn(70001)
    q_fast, q_ref = torch.empty(70001), torch.empty(70001)
    i_fast, i_ref = torch.empty(70001, dtype=torch.int16), torch.empty(70001, dtype=torch.int16)
    _C.lsq_forward(x, float(scale), 8, q=q_fast, index=i_fast, nthreads=2)
    _C.lsq_forward(x, float(scale), 8, q=q_ref, index=i_ref, reference=True)
    assert torch.equal(q_fast, q_ref) and torch.equal(i_fast, i_ref)
    g_fast, g_ref = torch.empty(70001), torch.empty(70001)
    for bounds in (0, _C.LSQ_LOW_INSIDE | _C.LSQ_HIGH_INSIDE, _C.LSQ_HIGH_INSIDE):
        s_fast = _C.lsq_backward(x, upstream, float(scale), 8, bounds, 0.01, grad_x=g_fast, nthreads=2)
        s_ref = _C.lsq_backward(x, upstream, float(scale), 8, bounds, 0.01, grad_x=g_ref, reference=True)
        assert torch.equal(g_fast, g_ref)
        assert s_fast == pytest.approx(s_ref, rel=1e-6)


# ---------------------------------------------------------------- training

def test_training_follows_diffq():
    theirs, ours = conv_net(), conv_net()
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    q_theirs = diffq.LSQ(theirs, bits=4, min_size=0)
    q_ours = diffq_c.LSQ(ours, bits=4, min_size=0)
    q_theirs.setup_optimizer(opt_theirs, lr=0.01)
    q_ours.setup_optimizer(opt_ours, lr=0.01)
    assert [g["lr"] for g in opt_ours.param_groups] == [g["lr"] for g in opt_theirs.param_groups]
    x = torch.randn(4, 8, 40, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        outs = []
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            opt.zero_grad()
            out = model(x)
            out.pow(2).mean().backward()
            outs.append(out.detach())
            if step == 0:
                grads = [p.grad.clone() for p in model.parameters()]
                if model is theirs:
                    grads_theirs = grads
                else:
                    for a, b in zip(grads, grads_theirs):
                        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_training_needs_optimizer_setup():
    model = conv_net()
    quantizer = diffq_c.LSQ(model, min_size=0)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        model(torch.randn(1, 8, 10))
    quantizer.no_optimizer()
    model(torch.randn(1, 8, 10))
    with pytest.raises(RuntimeError):
        quantizer.setup_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizer_created_after_quantizer_is_refused_and_clear_optimizer():
    model = conv_net()
    quantizer = diffq_c.LSQ(model, min_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="before the quantizer"):
        quantizer.setup_optimizer(opt)
    quantizer.clear_optimizer(opt)
    names = {id(p) for p in quantizer._scales()}
    assert not any(id(p) in names for g in opt.param_groups for p in g["params"])
    assert len(opt.param_groups[0]["params"]) == 4


def test_tied_weights_one_scale_and_detach():
    ours = Tied()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    quantizer = diffq_c.LSQ(ours, min_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffq adds the tied scale twice and torch warns
        quantizer.setup_optimizer(opt)
    assert len(opt.param_groups[1]["params"]) == 3
    quantizer.detach()  # diffq raises AttributeError here
    assert not [n for n, _ in ours.named_parameters() if n.endswith("_lsq")]
    theirs = diffq.LSQ(Tied(), min_size=0)
    with pytest.raises(AttributeError):
        theirs.detach()


def test_one_bit_trains():
    # high = 0 makes diffq's gradient scale 1 / sqrt(0); we take high = 1
    model = torch.nn.Linear(16, 16)
    theirs = diffq.LSQ(torch.nn.Linear(16, 16), bits=1, min_size=0)
    theirs.no_optimizer()
    with pytest.raises(ZeroDivisionError):
        theirs.model(torch.randn(2, 16))
    quantizer = diffq_c.LSQ(model, bits=1, min_size=0)
    quantizer.no_optimizer()
    model(torch.randn(2, 16)).sum().backward()
    assert torch.isfinite(model.weight_lsq.grad)
    index = quantizer._quantize_param(quantizer._qparams[0])[0]
    assert set(index.unique().tolist()) <= {-1, 0}


# ----------------------------------------------------- states and sizes

@pytest.mark.parametrize("bits", [3, 8, 15])
@pytest.mark.parametrize("torch_pack", [False, True])
def test_packed_state_identical_to_diffq(bits, torch_pack):
    theirs, ours = conv_net(), conv_net()
    q_theirs = diffq.LSQ(theirs, bits=bits, min_size=0.0005, float16=True)
    q_ours = diffq_c.LSQ(ours, bits=bits, min_size=0.0005, float16=True)
    s_theirs = q_theirs.get_quantized_state(torch_pack=torch_pack)
    s_ours = q_ours.get_quantized_state(torch_pack=torch_pack)
    assert len(s_ours["quantized"]) == len(s_theirs["quantized"]) == 2
    for (p_ours, sc_ours), (p_theirs, sc_theirs) in zip(s_ours["quantized"], s_theirs["quantized"]):
        assert p_ours.dtype == p_theirs.dtype and p_ours.shape == p_theirs.shape
        assert p_ours.numpy().tobytes() == p_theirs.numpy().tobytes()
        assert sc_ours.dtype == sc_theirs.dtype and torch.equal(sc_ours, sc_theirs)
    for a, b in zip(s_ours["float16"], s_theirs["float16"]):
        assert torch.equal(a, b)
    assert s_ours["meta"]["init_kwargs"] == s_theirs["meta"]["init_kwargs"]
    assert q_ours.model_size().item() == q_theirs.model_size().item()
    assert q_ours.true_model_size() == q_theirs.true_model_size()

    # each restores the other's state to the same eval weights
    x = torch.randn(2, 8, 20)
    theirs.eval()
    expected = theirs(x)
    fresh = conv_net(seed=7)
    diffq_c.restore_quantized_state(fresh, s_theirs)
    assert torch.equal(fresh.eval()(x), expected)
    fresh = conv_net(seed=7)
    diffq.restore_quantized_state(fresh, s_ours)
    assert torch.equal(fresh.eval()(x), expected)
    ours.eval()
    assert torch.equal(ours(x), expected)


def test_float64_model_uses_torch_path_like_diffq():
    theirs, ours = conv_net(dtype=torch.float64), conv_net(dtype=torch.float64)
    q_theirs = diffq.LSQ(theirs, bits=6, min_size=0)
    q_ours = diffq_c.LSQ(ours, bits=6, min_size=0)
    q_theirs.no_optimizer()
    q_ours.no_optimizer()
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    theirs(x).sum().backward()
    ours(x).sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(q_ours.get_quantized_state(packed=False)["quantized"][0][0],
                       q_theirs.get_quantized_state(packed=False)["quantized"][0][0])
