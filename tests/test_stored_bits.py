"""The stored (rounded) bits computed by the C kernel after torch's sigmoid
equal torch's float32 evaluation of diffq's formula, bit for bit, also for
logits whose bits fall next to the .5 rounding boundaries."""
import pytest
import torch

from diffq_c import ops


def torch_stored_bits(logit, min_bits, max_bits, extra_bits):
    t = torch.sigmoid(logit)
    bits = extra_bits + (max_bits * t + (1 - t) * min_bits)
    return bits.round().clamp(1, 15).byte()


@pytest.mark.parametrize("min_bits,max_bits,extra_bits", [(2, 15, 0), (2, 15, 1.5), (1, 8, -0.5), (3, 12, 0.25)])
def test_stored_bits_match_torch_bit_for_bit(min_bits, max_bits, extra_bits):
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(1 << 20, generator=gen) * 24 - 12
    # logits whose bits land within a few ulps of every k + 0.5
    halves = torch.arange(min_bits, max_bits, dtype=torch.float64) + 0.5 - extra_bits
    t = ((halves - min_bits) / (max_bits - min_bits)).clamp(1e-6, 1 - 1e-6)
    edge = torch.logit(t).float()
    nudged = torch.cat([torch.nextafter(edge, edge + k) for k in (-1, 1)] + [edge])
    for _ in range(4):
        nudged = torch.cat([nudged, torch.nextafter(nudged, nudged + 1)])
    logit = torch.cat([dense, nudged])
    prm = ops.BitsParam.make("bits", min_bits, max_bits)
    ours = ops.stored_bits(logit, prm, extra_bits)
    assert torch.equal(ours, torch_stored_bits(logit, min_bits, max_bits, extra_bits))


def test_nan_logits_are_refused_with_the_parameter_name():
    prm = ops.BitsParam.make("bits", 2, 15)
    with pytest.raises(ValueError, match="'layer.weight'"):
        ops.stored_bits(torch.tensor([0.0, float("nan")]), prm, 0, name="layer.weight")
