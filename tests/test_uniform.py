"""UniformQuantizer against the real diffq 0.2.4: levels, scales, packed
bytes, sizes, and quantization-aware training values and gradients."""
import inspect

import pytest
import torch

import diffq  # the oracle: these tests must fail, not skip, without it
import diffq.uniform as diffq_uniform
import diffq_c
from diffq_c import uniform as ours_uniform
from diffq_c.utils import QuantizerConfigError


def conv_net(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv1d(8, 32, 5), torch.nn.ReLU(),
                               torch.nn.Conv1d(32, 16, 3), torch.nn.ReLU(),
                               torch.nn.Conv1d(16, 4, 1))


def test_signature_and_defaults_match_diffq():
    ours = inspect.signature(diffq_c.UniformQuantizer.__init__).parameters
    theirs = inspect.signature(diffq.UniformQuantizer.__init__).parameters
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8, 9, 12, 15])
def test_levels_and_scales_match_diffq(bits):
    gen = torch.Generator().manual_seed(bits)
    for shape in [(5,), (33, 17), (70001,)]:
        p = torch.randn(*shape, generator=gen) * 0.2
        theirs_levels, theirs_scales = diffq_uniform.uniform_quantize(p, torch.tensor(float(bits)))
        levels, scales = ours_uniform.uniform_quantize(p, torch.tensor(float(bits)))
        assert levels.dtype == theirs_levels.dtype and torch.equal(levels, theirs_levels)
        assert scales == theirs_scales
        back = ours_uniform.uniform_unquantize(levels, scales, torch.tensor(float(bits)))
        theirs_back = diffq_uniform.uniform_unquantize(theirs_levels, theirs_scales,
                                                       torch.tensor(float(bits)))
        assert torch.equal(back, theirs_back)


@pytest.mark.parametrize("bits", [2, 4, 8, 13])
def test_packed_state_and_sizes_match_diffq(bits):
    theirs, ours = conv_net(), conv_net()
    q_theirs = diffq.UniformQuantizer(theirs, bits=bits, min_size=0.0005, float16=True)
    q_ours = diffq_c.UniformQuantizer(ours, bits=bits, min_size=0.0005, float16=True)
    s_theirs = q_theirs.get_quantized_state()
    s_ours = q_ours.get_quantized_state()
    assert len(s_ours["quantized"]) == len(s_theirs["quantized"]) == 2
    for (packed, scales), (packed_theirs, scales_theirs) in zip(s_ours["quantized"],
                                                                s_theirs["quantized"]):
        assert packed.dtype == packed_theirs.dtype and packed.shape == packed_theirs.shape
        assert packed.numpy().tobytes() == packed_theirs.numpy().tobytes()
        assert scales == scales_theirs
    for a, b in zip(s_ours["float16"], s_theirs["float16"]):
        assert torch.equal(a, b)
    for a, b in zip(s_ours["others"], s_theirs["others"]):
        assert torch.equal(a, b)
    assert s_ours["meta"]["init_kwargs"] == s_theirs["meta"]["init_kwargs"]
    assert q_ours.model_size().item() == q_theirs.model_size().item()
    assert q_ours.true_model_size() == q_theirs.true_model_size()
    assert repr(q_ours) == repr(q_theirs)

    x = torch.randn(2, 8, 30)
    theirs.eval()
    ours.eval()
    expected = theirs(x)
    assert torch.equal(ours(x), expected)
    fresh = conv_net(seed=5)
    diffq_c.restore_quantized_state(fresh, s_theirs)
    assert torch.equal(fresh.eval()(x), expected)
    fresh = conv_net(seed=5)
    diffq.restore_quantized_state(fresh, s_ours)
    assert torch.equal(fresh.eval()(x), expected)


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 15, 7.5])
def test_eval_weights_match_diffq(bits):
    """The eval forward (one pass to the quantized values for whole bits, the
    levels' way for fractional ones) gives diffq's outputs exactly, forward
    after forward."""
    theirs, ours = conv_net(seed=3), conv_net(seed=3)
    diffq.UniformQuantizer(theirs, bits=bits, min_size=0)
    diffq_c.UniformQuantizer(ours, bits=bits, min_size=0)
    theirs.eval()
    ours.eval()
    for step in range(3):
        x = torch.randn(2, 8, 30)
        assert torch.equal(ours(x), theirs(x)), step


def test_unpacked_state_matches_diffq():
    theirs, ours = conv_net(), conv_net()
    s_theirs = diffq.UniformQuantizer(theirs, bits=5, min_size=0).get_quantized_state(packed=False)
    s_ours = diffq_c.UniformQuantizer(ours, bits=5, min_size=0).get_quantized_state(packed=False)
    for (levels, scales), (levels_theirs, scales_theirs) in zip(s_ours["quantized"],
                                                                s_theirs["quantized"]):
        assert levels.dtype == levels_theirs.dtype and torch.equal(levels, levels_theirs)
        assert scales == scales_theirs


@pytest.mark.parametrize("bits", [3, 8])
def test_qat_training_forward_and_gradients_match_diffq(bits):
    theirs, ours = conv_net(), conv_net()
    diffq.UniformQuantizer(theirs, bits=bits, qat=True, min_size=0)
    diffq_c.UniformQuantizer(ours, bits=bits, qat=True, min_size=0)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out_theirs = theirs(x)
        out_ours = ours(x)
        # the forward sees the quantized weights: same values as diffq
        assert torch.equal(out_ours, out_theirs)
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        out_theirs.pow(2).mean().backward()
        out_ours.pow(2).mean().backward()
        # straight-through: the float weights get the quantized weights' gradient
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a.grad, b.grad)
        opt_theirs.step()
        opt_ours.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    # outside of training forwards the float weights are in place
    assert all(isinstance(p, torch.nn.Parameter) for p in ours.parameters())


def test_without_qat_training_sees_float_weights():
    model = conv_net()
    reference = conv_net()
    diffq_c.UniformQuantizer(model, bits=2, min_size=0)
    x = torch.randn(1, 8, 20)
    assert torch.equal(model(x), reference(x))
    model.eval()
    reference.eval()
    assert not torch.equal(model(x), reference(x))


@pytest.mark.parametrize("bits", [0, 16])
def test_bad_bits_refused(bits):
    # diffq takes them and fails at the first quantization with an assert
    with pytest.raises(QuantizerConfigError):
        diffq_c.UniformQuantizer(conv_net(), bits=bits)
    theirs = diffq.UniformQuantizer(conv_net(), bits=bits, min_size=0)
    with pytest.raises(AssertionError):
        theirs.get_quantized_state()
