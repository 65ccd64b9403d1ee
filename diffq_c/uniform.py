"""Uniform quantization over a fixed number of bits."""
import typing as tp

import torch

from . import ops
from .base import BaseQuantizer, packed_planes
from .utils import QuantizerConfigError, capture_init, simple_repr


def uniform_quantize(p: torch.Tensor, bits: torch.Tensor = torch.tensor(8.)):
    """Levels of `p` over its own [min, max] range with `bits` bits (a scalar,
    or one value per row of a 2-D `p`), and that range as (min, max).
    Levels are uint8 when all bits are <= 8, int16 otherwise."""
    return ops.quantize_levels(p, bits)


def uniform_unquantize(levels: torch.Tensor, scales: tp.Tuple[float, float],
                       bits: torch.Tensor = torch.tensor(8.)) -> torch.Tensor:
    """Float32 values back from `uniform_quantize`'s levels and range."""
    return ops.dequantize_levels(levels, scales, bits)


class UniformQuantizer(BaseQuantizer):
    @capture_init
    def __init__(self, model: torch.nn.Module, bits: float = 8., min_size: float = 0.01,
                 float16: bool = False, qat: bool = False, exclude=[], detect_bound=True):
        """Every quantized parameter over the same number of `bits`.

        Args:
            model: the model to quantize.
            bits: bits per weight, 1 to 15.
            min_size: parameters of at most this size in MB stay unquantized.
            float16: keep those small parameters in float16 rather than float32.
            qat: quantization-aware training: each training forward sees the
                quantized weights, with a straight-through gradient.
            exclude: fnmatch patterns of parameter names to leave unquantized.
            detect_bound: quantize a tensor used by several modules only once.
        """
        if not 1 <= float(bits) <= 15:
            raise QuantizerConfigError(f"bits must lie in 1..15, got {bits}")
        self.bits = float(bits)
        self.qat = qat
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def __repr__(self):
        return simple_repr(self)

    def _pre_forward_train(self):
        if not self.qat:
            return False
        for qparam in self._qparams:
            if qparam.other is not None:
                swapped = qparam.other.module._parameters[qparam.other.name]
            else:
                value = self._unquantize_param(qparam, self._quantize_param(qparam))
                value = value.to(qparam.param).view_as(qparam.param)
                # straight-through: forward sees value, gradient flows to param
                swapped = qparam.param + (value - qparam.param).detach()
            qparam.module._parameters[qparam.name] = swapped
        return True

    def _post_forward_train(self):
        return self.qat and self._put_back_params()

    def _quantized_value(self, qparam) -> torch.Tensor:
        # eval with whole bits: one pass to the quantized values (the same
        # numbers as dequantizing the levels), into memory kept between
        # forwards; fractional bits take the levels' way
        if float(self.bits).is_integer():
            bits = torch.full((1,), int(self.bits), dtype=torch.uint8)
            value = ops.requantize(qparam.param.data, bits, 0, name=self._param_name(qparam),
                                   alloc=self._scratch.lender(id(qparam), small_too=True))
            if value is not None:
                return value
        return super()._quantized_value(qparam)

    def _quantize_param(self, qparam):
        return ops.quantize_levels(qparam.param.data, torch.tensor(self.bits),
                                   name=self._param_name(qparam))

    def _unquantize_param(self, qparam, quantized):
        if not isinstance(quantized, (tuple, list)) or len(quantized) != 2:
            raise ValueError(f"expected (levels, scales), got {type(quantized).__name__}")
        levels, scales = quantized
        if not isinstance(levels, torch.Tensor):
            raise TypeError(f"levels must be a tensor, got {type(levels).__name__}")
        if levels.shape != qparam.param.shape:
            raise ValueError(f"levels have shape {tuple(levels.shape)}, the parameter has "
                             f"{tuple(qparam.param.shape)}")
        return ops.dequantize_levels(levels, scales, torch.tensor(self.bits),
                                     name=self._param_name(qparam))

    def _bit_pack_param(self, qparam, quantized, pack_fn):
        levels, scales = quantized
        return (pack_fn(levels, self.bits), scales)

    def _bit_unpack_param(self, qparam, packed, unpack_fn):
        if not isinstance(packed, (tuple, list)) or len(packed) != 2:
            raise ValueError(f"expected (packed levels, scales), got {type(packed).__name__}")
        packed_levels, scales = packed
        planes = packed_planes(packed_levels)
        if planes is not None and planes != int(self.bits):
            raise ValueError(f"packed levels have {planes} bit planes, expected {int(self.bits)}")
        levels = unpack_fn(packed_levels, qparam.param.numel())
        return (levels.to(qparam.param.device).view_as(qparam.param), scales)

    def model_size(self):
        """Size in MB (not differentiable: the bits are fixed)."""
        total = super().model_size()
        subtotal = 0
        for qparam in self._unique_qparams():
            subtotal += self.bits * qparam.param.numel() + 64  # + min and max as float32
        return total + subtotal / (2 ** 20 * 8)

    def true_model_size(self):
        return self.model_size().item()
