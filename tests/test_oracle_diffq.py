"""DiffQuantizer against the real diffq 0.2.4: levels, scales, bits, packed
bytes, restores both ways, sizes, eval outputs."""
import io

import diffq
import pytest
import torch

import diffq_c
from conftest import randomize_logits, twin_models


def linear():
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def conv1d():
    return torch.nn.Sequential(torch.nn.Conv1d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv1d(16, 8, 5))


def lstm():
    return torch.nn.LSTM(16, 32, num_layers=2)


MODELS = {"linear": linear, "conv1d": conv1d, "lstm": lstm}
INPUTS = {
    "linear": lambda: torch.randn(4, 48),
    "conv1d": lambda: torch.randn(2, 8, 20),
    "lstm": lambda: torch.randn(7, 3, 16),
}


def make_pair(model_name, group_size, param, extra=None):
    ours_model, theirs_model = twin_models(MODELS[model_name])
    kwargs = dict(min_size=0, group_size=group_size, param=param, **(extra or {}))
    ours = diffq_c.DiffQuantizer(ours_model, **kwargs)
    theirs = diffq.DiffQuantizer(theirs_model, **kwargs)
    randomize_logits(ours, theirs)
    return ours, theirs


def weights(model):
    """The model's own parameters, without the logits a quantizer added."""
    return [p for n, p in model.named_parameters() if not n.endswith("_diffq")]


def assert_packed_equal(a, b):
    levels_a, scales_a, bits_a = a
    levels_b, scales_b, bits_b = b
    assert scales_a == scales_b
    assert bits_a.dtype == bits_b.dtype and torch.equal(bits_a, bits_b)
    assert len(levels_a) == len(levels_b)
    for x, y in zip(levels_a, levels_b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.numpy().tobytes() == y.numpy().tobytes()


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("group_size", [0, 1, 8])
@pytest.mark.parametrize("param", ["bits", "noise"])
def test_levels_scales_bits_identical(model_name, group_size, param):
    ours, theirs = make_pair(model_name, group_size, param)
    state_ours = ours.get_quantized_state(packed=False)
    state_theirs = theirs.get_quantized_state(packed=False)
    assert len(state_ours["quantized"]) == len(state_theirs["quantized"]) > 0
    for (la, sa, ba), (lb, sb, bb) in zip(state_ours["quantized"], state_theirs["quantized"]):
        assert la.dtype == lb.dtype
        assert torch.equal(la, lb)
        assert sa == sb
        assert torch.equal(ba, bb)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("group_size", [0, 1, 8])
@pytest.mark.parametrize("param", ["bits", "noise"])
def test_packed_bytes_identical(model_name, group_size, param):
    ours, theirs = make_pair(model_name, group_size, param)
    for a, b in zip(ours.get_quantized_state()["quantized"], theirs.get_quantized_state()["quantized"]):
        assert_packed_equal(a, b)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("group_size", [1, 8])
def test_restore_across_implementations(model_name, group_size):
    ours, theirs = make_pair(model_name, group_size, "bits")
    expected = ours.get_quantized_state(packed=False)
    # diffq -> diffq_c
    fresh_ours, fresh_theirs = twin_models(MODELS[model_name])
    q_ours = diffq_c.DiffQuantizer(fresh_ours, min_size=0, group_size=group_size)
    q_ours.restore_quantized_state(theirs.get_quantized_state())
    # diffq_c -> diffq
    q_theirs = diffq.DiffQuantizer(fresh_theirs, min_size=0, group_size=group_size)
    q_theirs.restore_quantized_state(ours.get_quantized_state())
    # both now hold exactly the dequantized weights of the original
    with ours.enter_quantize():
        for p, a, b in zip(weights(ours.model), weights(fresh_ours), weights(fresh_theirs)):
            assert torch.equal(p, a)
            assert torch.equal(p, b)
    assert len(expected["quantized"]) == len(q_ours._qparams)


@pytest.mark.parametrize("group_size", [0, 1, 8])
def test_module_level_restore_of_diffq_state_maps_to_our_class(group_size):
    ours, theirs = make_pair("linear", group_size, "bits")
    # diffq's state names diffq's class; ours builds a diffq_c quantizer from it
    if group_size == 0:
        # diffq itself cannot restore its group_size=0 packed states
        with pytest.raises(RuntimeError):
            diffq.restore_quantized_state(linear(), theirs.get_quantized_state())
    fresh = linear()
    diffq_c.restore_quantized_state(fresh, theirs.get_quantized_state())
    with ours.enter_quantize():
        for p, a in zip(weights(ours.model), weights(fresh)):
            assert torch.equal(p, a)
    assert not any(n.endswith("_diffq") for n, _ in fresh.named_parameters())


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("group_size", [0, 1, 8])
def test_eval_outputs_identical(model_name, group_size):
    ours, theirs = make_pair(model_name, group_size, "bits")
    x = INPUTS[model_name]()
    ours.model.eval()
    theirs.model.eval()
    out_ours, out_theirs = ours.model(x), theirs.model(x)
    if isinstance(out_ours, tuple):
        out_ours, out_theirs = out_ours[0], out_theirs[0]
    assert torch.equal(out_ours, out_theirs)


@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("group_size", [0, 1, 8])
@pytest.mark.parametrize("extra_bits", [0, 1.5])
def test_model_size_value_and_gradient(param, group_size, extra_bits):
    ours, theirs = make_pair("linear", group_size, param, {"extra_bits": extra_bits})
    size_ours, size_theirs = ours.model_size(), theirs.model_size()
    torch.testing.assert_close(size_ours, size_theirs, rtol=1e-6, atol=0)
    size_ours.backward()
    size_theirs.backward()
    for a, b in zip(ours._qparams, theirs._qparams):
        torch.testing.assert_close(a.logit.grad, b.logit.grad, rtol=1e-5, atol=1e-12)
    assert ours.true_model_size() == theirs.true_model_size()
    assert ours.model_size(exact=True).item() == theirs.model_size(exact=True).detach().item()


def test_true_model_size_with_small_params_float16():
    ours, theirs = twin_models(linear)
    q_ours = diffq_c.DiffQuantizer(ours, min_size=0.002, float16=True, group_size=4)
    q_theirs = diffq.DiffQuantizer(theirs, min_size=0.002, float16=True, group_size=4)
    assert len(q_ours._float16) == len(q_theirs._float16) > 0
    assert q_ours.true_model_size() == q_theirs.true_model_size()


def test_fifteen_bit_groups_survive_packing_where_diffq_loses_them():
    """diffq packs levels of widths 1..14 only: groups rounded to 15 bits come
    back as uninitialized memory. We add their entry (only when needed, so
    other states stay byte-identical) and diffq reads it correctly."""
    ours, theirs = make_pair("linear", 8, "bits")
    with torch.no_grad():
        for a, b in zip(ours._qparams, theirs._qparams):
            a.logit[::2] = 12.0  # bits ~ 15 - tiny -> rounds to 15
            b.logit.copy_(a.logit)
    state = ours.get_quantized_state()
    assert any(len(q[0]) == 15 and q[0][14] is not None for q in state["quantized"])
    with ours.enter_quantize():
        expected = [p.detach().clone() for p in weights(ours.model)]
    # diffq itself restores our state correctly
    fresh = linear()
    q = diffq.DiffQuantizer(fresh, min_size=0, group_size=8)
    q.restore_quantized_state(state)
    for p, e in zip(weights(fresh), expected):
        assert torch.equal(p, e)
    # and we refuse diffq's own lossy state with a clear message
    fresh2 = linear()
    q2 = diffq_c.DiffQuantizer(fresh2, min_size=0, group_size=8)
    with pytest.raises(ValueError, match="15"):
        q2.restore_quantized_state(theirs.get_quantized_state())


def test_saved_state_roundtrip_through_torch_save():
    ours, _ = make_pair("conv1d", 8, "bits")
    buffer = io.BytesIO()
    torch.save(ours.get_quantized_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True by default
    fresh = conv1d()
    diffq_c.restore_quantized_state(fresh, state)
    ours.model.eval()
    fresh.eval()
    x = INPUTS["conv1d"]()
    assert torch.equal(ours.model(x), fresh(x))


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 7, 11, 31, 63, 127, 255, 511, 1023, 2049])
@pytest.mark.parametrize("group_size", [0, 1])
def test_odd_sizes_match_diffq(numel, group_size):
    def factory():
        m = torch.nn.Module()
        m.w = torch.nn.Parameter(torch.randn(numel))
        return m
    ours_m, theirs_m = twin_models(factory)
    ours = diffq_c.DiffQuantizer(ours_m, min_size=0, group_size=group_size)
    theirs = diffq.DiffQuantizer(theirs_m, min_size=0, group_size=group_size)
    randomize_logits(ours, theirs)
    for a, b in zip(ours.get_quantized_state()["quantized"], theirs.get_quantized_state()["quantized"]):
        assert_packed_equal(a, b)


def test_repr_and_init_kwargs_like_diffq():
    ours_m, theirs_m = twin_models(linear)
    ours = diffq_c.DiffQuantizer(ours_m, min_size=0, group_size=8, noise="uniform")
    theirs = diffq.DiffQuantizer(theirs_m, min_size=0, group_size=8, noise="uniform")
    assert repr(ours) == repr(theirs)
    assert ours._init_kwargs.keys() == theirs._init_kwargs.keys()
    names_ours = [n for n, _ in ours_m.named_parameters()]
    names_theirs = [n for n, _ in theirs_m.named_parameters()]
    assert names_ours == names_theirs


@pytest.mark.parametrize("kwargs", [
    dict(noise="laplace"), dict(group_size=-1), dict(init_bits=1), dict(init_bits=16),
    dict(min_bits=8, init_bits=8)])
def test_constructor_errors_like_diffq(kwargs):
    with pytest.raises(AssertionError):
        diffq.DiffQuantizer(linear(), **kwargs)
    with pytest.raises(AssertionError):
        diffq_c.DiffQuantizer(linear(), **kwargs)
    with pytest.raises(ValueError):
        diffq_c.DiffQuantizer(linear(), **kwargs)


def test_group_size_must_divide_and_names_the_parameter():
    with pytest.raises(ValueError, match=r"'0\.weight'.*3072"):
        diffq_c.DiffQuantizer(linear(), min_size=0, group_size=7)


def test_applying_twice_is_refused():
    model = linear()
    diffq_c.DiffQuantizer(model, min_size=0)
    with pytest.raises(RuntimeError):
        diffq_c.DiffQuantizer(model, min_size=0)


def test_exclude_and_min_size_pick_the_same_params():
    ours_m, theirs_m = twin_models(linear)
    kwargs = dict(min_size=0.001, exclude=["*.bias"], float16=True)
    ours = diffq_c.DiffQuantizer(ours_m, **kwargs)
    theirs = diffq.DiffQuantizer(theirs_m, **kwargs)
    assert [qp.name for qp in ours._qparams] == [qp.name for qp in theirs._qparams]
    assert len(ours._float16) == len(theirs._float16)
    assert len(ours._others) == len(theirs._others) == 0


def test_tied_weights_share_state_and_logit():
    def tied():
        m = torch.nn.Module()
        m.a = torch.nn.Linear(32, 32, bias=False)
        m.b = torch.nn.Linear(32, 32, bias=False)
        m.b.weight = m.a.weight
        m.forward = lambda x: m.b(m.a(x))
        return m
    model = tied()
    q = diffq_c.DiffQuantizer(model, min_size=0)
    assert len(q._qparams) == 2 and q._qparams[1].other is q._qparams[0]
    assert q._qparams[1].logit is q._qparams[0].logit
    assert len(q.get_quantized_state()["quantized"]) == 1
    q.detach()  # diffq raises AttributeError here for tied weights in other modules
    assert not any(n.endswith("_diffq") for n, _ in model.named_parameters())
