"""Learnt step size quantization (LSQ, Esser et al. 2019,
https://arxiv.org/abs/1902.08153), for weights only.

Each quantized tensor gets one learnt scale s, registered on its module as
`<name><suffix>`. Training forwards see round(clamp(w / s, low, high)) * s,
with low = -2^(bits-1) and high = 2^(bits-1) - 1; the rounding is
straight-through and the gradient reaching s is scaled by
1 / sqrt(numel * high), as in the paper. Stored states hold the integer
indexes and s.
"""
from dataclasses import dataclass
import typing as tp

import torch

from . import ops
from .base import BaseQuantizer
from .utils import QuantizerConfigError, capture_init, simple_repr


def _probe_clamp_bounds() -> int:
    """Which bounds of torch.clamp pass the gradient, as the kernels' bitmask
    (ops._C.LSQ_LOW_INSIDE, LSQ_HIGH_INSIDE). torch changed it: both up to
    2.13, neither from 2.14 (pytorch issue 184574). diffq's LSQ is torch
    autograd through clamp, so its gradients for a weight exactly on a bound
    follow the installed torch; asking torch keeps ours equal to them on
    every version. Public autograd on two values, once."""
    with torch.inference_mode(False), torch.enable_grad():
        # on the CPU whatever a `with torch.device(...)` around the caller says
        x = torch.tensor([-1.0, 1.0], device="cpu", requires_grad=True)
        (grad,) = torch.autograd.grad(x.clamp(-1.0, 1.0).sum(), x)
    low, high = (float(v) for v in grad.tolist())
    return (ops._C.LSQ_LOW_INSIDE if low else 0) | (ops._C.LSQ_HIGH_INSIDE if high else 0)


_CLAMP_BOUNDS: tp.Optional[int] = None


def clamp_bounds() -> int:
    """_probe_clamp_bounds(), asked on first use (not at import: an import
    inside a dispatch mode or a trace would see that mode's tensors)."""
    global _CLAMP_BOUNDS
    if _CLAMP_BOUNDS is None:
        _CLAMP_BOUNDS = _probe_clamp_bounds()
    return _CLAMP_BOUNDS


def _index_range(bits: int) -> tp.Tuple[int, int]:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _grad_scale(numel: int, bits: int) -> float:
    """The factor on the scale's gradient. With 1 bit, high is 0 and the
    paper's 1 / sqrt(numel * high) is infinite (diffq divides by zero); we
    use high = 1 there, the size of the one step between the two levels."""
    high = max(_index_range(bits)[1], 1)
    return 1 / (numel * high) ** 0.5


class _LSQValues(torch.autograd.Function):
    """round(clamp(x / s, low, high)) * s with the straight-through gradient
    for x and the LSQ gradient for s, in C. Only x is kept for backward:
    x / s is recomputed there."""

    @staticmethod
    def forward(ctx, x, scale, bits, grad_scale):
        effective = ops._C.lsq_effective_scale(float(scale), grad_scale)
        out = torch.empty(x.shape, dtype=torch.float32)
        ops._C.lsq_forward(ops._flat(x), effective, bits, q=out.view(-1), nthreads=ops.num_threads())
        ctx.save_for_backward(x)
        ctx.scale = scale  # its shape; itself for a backward in torch operators
        ctx.config = (effective, bits, grad_scale)
        ctx.bounds = clamp_bounds()
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        effective, bits, grad_scale = ctx.config
        if ops.needs_torch_backward([grad]):  # diffq's formula in torch
            values = lambda x, scale: [_quantize_torch(x, scale, bits, grad_scale)[0]]  # noqa: E731
            return (*ops.torch_grads(values, [grad], [x, ctx.scale]), None, None)
        grad_x = torch.empty(x.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_s = ops._C.lsq_backward(ops._flat(x), ops._flat(grad), effective, bits, ctx.bounds, grad_scale,
                                     grad_x=None if grad_x is None else grad_x.view(-1),
                                     nthreads=ops.num_threads())
        grad_s = torch.full(ctx.scale.shape, grad_s, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


def _quantize_torch(tensor: torch.Tensor, scale: torch.Tensor, bits: int, grad_scale: float):
    """The same computation in torch autograd, for devices and dtypes the
    kernels do not take: (values, float indexes)."""
    low, high = _index_range(bits)
    # value of scale, gradient of scale * grad_scale
    scaled = scale * grad_scale
    scale = (scale - scaled).detach() + scaled
    ratio = (tensor / scale).clamp(low, high)
    # rounded value, gradient of the identity
    index = ratio + (ratio.round() - ratio).detach()
    return index * scale, index


def quantize(tensor: torch.Tensor, scale: torch.Tensor, bits: int):
    """(quantized values, indexes as floats) of `tensor` for the learnt
    `scale`. The values are differentiable in tensor and scale; the indexes
    carry no gradient."""
    bits = int(bits)
    grad_scale = _grad_scale(tensor.numel(), bits)
    if ops.on_kernel_path(tensor, scale) and scale.numel() == 1:
        values = _LSQValues.apply(tensor, scale, bits, grad_scale)
        index, nans = _kernel_indexes(tensor.detach(), scale.detach(), bits, grad_scale)
        index = index.float()
        if nans:
            # NaN levels come out as NaN, as from diffq's formula
            index[torch.isnan(values.detach())] = float("nan")
        return values, index
    values, index = _quantize_torch(tensor, scale, bits, grad_scale)
    return values, index.detach()


def quantized_values(tensor: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The training forward's weights: differentiable quantized values."""
    grad_scale = _grad_scale(tensor.numel(), bits)
    if ops.on_kernel_path(tensor, scale) and scale.numel() == 1:
        try:
            return _LSQValues.apply(tensor, scale, bits, grad_scale)
        except RuntimeError:
            # torch.func's transforms need functorch's protocol of an
            # autograd.Function, and memory the kernels cannot have there
            if not ops.transforms_active():
                raise
    return _quantize_torch(tensor, scale, bits, grad_scale)[0]


def lsq_indexes(tensor: torch.Tensor, scale: torch.Tensor, bits: int, name: str = "?") -> torch.Tensor:
    """int16 indexes in [-2^(bits-1), 2^(bits-1) - 1], as stored."""
    grad_scale = _grad_scale(tensor.numel(), bits)
    tensor, scale = tensor.detach(), scale.detach()
    if ops.on_kernel_path(tensor, scale) and scale.numel() == 1:
        index, nans = _kernel_indexes(tensor, scale, bits, grad_scale)
    else:
        index = _quantize_torch(tensor, scale, bits, grad_scale)[1]
        nans = int(torch.isnan(index).sum())
    if nans:
        raise ValueError(f"parameter {name!r}: {nans} weights have no LSQ index (NaN weights, "
                         f"or a zero scale on zero weights; scale = {float(scale)})")
    return index.short()


def _kernel_indexes(tensor, scale, bits, grad_scale) -> tp.Tuple[torch.Tensor, int]:
    """int16 indexes from the C forward, and the count of NaN levels (their
    index is 0)."""
    effective = ops._C.lsq_effective_scale(float(scale), grad_scale)
    index = torch.empty(tensor.shape, dtype=torch.int16)
    nans = ops._C.lsq_forward(ops._flat(tensor), effective, bits, index=index.view(-1),
                              nthreads=ops.num_threads())
    return index, nans


class LSQ(BaseQuantizer):
    @dataclass
    class _QuantizedParam(BaseQuantizer._QuantizedParam):
        scale: torch.nn.Parameter

    @capture_init
    def __init__(self, model: torch.nn.Module, bits: int = 8, min_size: float = 0.01,
                 float16: bool = False, suffix: str = "_lsq", exclude=[], detect_bound=True):
        """Learnt step size quantizer.

        Args:
            model: the model to quantize; the scales are registered on its
                modules as `<name><suffix>` parameters.
            bits: bits per weight, an integer in 1..15.
            min_size: parameters of at most this size in MB stay unquantized.
            float16: keep those small parameters in float16 rather than float32.
            suffix: name suffix of the scale parameters.
            exclude: fnmatch patterns of parameter names to leave unquantized.
            detect_bound: quantize a tensor used by several modules only once.

        Call `setup_optimizer` (or `no_optimizer`) before training.
        """
        if not 0 < bits <= 15 or float(bits) != int(bits):
            raise QuantizerConfigError(f"bits must be an integer in 1..15, got {bits!r}")
        self.bits = bits
        self.suffix = suffix
        self._optimizer_setup = False
        for name, _ in model.named_parameters():
            if name.endswith(suffix):
                raise RuntimeError(f"the model already has a parameter ending in {suffix!r} "
                                   f"({name}): was an LSQ quantizer applied to it twice?")
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def __repr__(self):
        return simple_repr(self)

    @property
    def _int_bits(self) -> int:
        return int(self.bits)

    def _register_param(self, name, param, module, other):
        if other is not None:
            return self.__class__._QuantizedParam(name=name, param=param, module=module,
                                                  other=other, scale=other.scale)
        # the paper's initialisation: 2 * mean(|w|) / sqrt(high + 1)
        init = 2 * param.data.abs().mean() / (2 ** (self._int_bits - 1)) ** 0.5
        scale = torch.nn.Parameter(init)
        module.register_parameter(name + self.suffix, scale)
        return self.__class__._QuantizedParam(name=name, param=param, module=module,
                                              other=None, scale=scale)

    _EXTRA_ATTR = "scale"

    # ------------------------------------------------------------ optimizer

    def _scales(self):
        return [qp.scale for qp in self._unique_qparams()]

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, **kwargs):
        """Add the scales to `optimizer` as their own group. As in the paper
        they train with the optimizer's own settings; `kwargs` override them."""
        self._add_optimizer_group(optimizer, self._scales(), "LSQ scales", dict(kwargs))

    def no_optimizer(self):
        """Train without learning the scales."""
        self._optimizer_setup = True

    def clear_optimizer(self, optimizer: torch.optim.Optimizer):
        """Remove the scales from every group of `optimizer`."""
        self._remove_from_optimizer(optimizer, self._scales())

    # ---------------------------------------------------------------- sizes

    def model_size(self, exact=False):
        """Size in MB: bits per weight plus one float32 scale per tensor
        (`exact` is accepted for diffq's signature; the size is exact)."""
        total = super().model_size()
        subtotal = 0
        for qparam in self._unique_qparams():
            subtotal += qparam.param.numel() * self.bits + 32
        return total + subtotal / (2 ** 20 * 8)

    def true_model_size(self):
        return self.model_size(exact=True).item()

    # ------------------------------------------------------------- training

    def _pre_forward_train(self):
        self._require_optimizer()
        for qparam in self._qparams:
            values = quantized_values(qparam.param, qparam.scale, self._int_bits)
            # bypass nn.Module's check that parameters are leaves
            qparam.module._parameters[qparam.name] = values
        return True

    def _post_forward_train(self):
        return self._put_back_params()

    # ------------------------------------------------------------ quantized

    def _quantize_param(self, qparam):
        index = lsq_indexes(qparam.param.data, qparam.scale.data, self._int_bits,
                            name=self._param_name(qparam))
        return index, qparam.scale.detach().clone()

    def _unquantize_param(self, qparam, quantized):
        index, scale = quantized
        return index.float() * scale

    def _bit_pack_param(self, qparam, quantized, pack_fn):
        index, scale = quantized
        # stored shifted to be non-negative, on as many bits as the largest needs
        return (pack_fn(index + 2 ** (self._int_bits - 1)), scale)

    def _bit_unpack_param(self, qparam, packed, unpack_fn):
        packed_index, scale = packed
        shifted = unpack_fn(packed_index, qparam.param.numel())
        index = shifted.to(qparam.param.device).view_as(qparam.param) - 2 ** (self._int_bits - 1)
        return (index, scale)

    def detach(self):
        super().detach()
        for qparam in self._qparams:
            # a tied parameter's scale is registered on the first module only
            if qparam.other is None and hasattr(qparam.module, qparam.name + self.suffix):
                delattr(qparam.module, qparam.name + self.suffix)
