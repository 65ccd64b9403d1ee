"""Tensor-level operations: allocate outputs, pick the C kernels or the pure
torch path, and define autograd for the noisy weights and the size penalty.

The C kernels take CPU float32 buffers. Everything else (CUDA tensors,
float16/float64 parameters, an extension that failed to load) runs the same
math in plain torch, so nothing fails where diffq works.
"""
import math
import sys
import typing as tp
import warnings

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    warnings.warn(f"diffq_c: C kernels unavailable ({exc}); using the pure torch path.")

NOISE_KINDS = {"uniform": 0, "gaussian": 1}
PARAM_MODES = {"bits": 0, "noise": 1}


# the binding refuses more (OpenMP would try to start them all)
MAX_THREADS = 1024


def num_threads() -> int:
    """Threads for the kernels: torch's own setting, so we never oversubscribe it."""
    return min(MAX_THREADS, max(1, torch.get_num_threads()))


def kernels_available() -> bool:
    return _C is not None


def on_kernel_path(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can serve these tensors (CPU, float32)."""
    return _C is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous detached 1-D view, copying only when the layout needs it
    (channels_last or transposed weights)."""
    return t.detach().contiguous().view(-1)


class BitsParam(tp.NamedTuple):
    """How logits map to bits, as the kernels take it."""
    mode: int
    min_bits: float
    max_bits: float
    log_min_noise: float
    log_max_noise: float

    @classmethod
    def make(cls, param: str, min_bits: float, max_bits: float) -> "BitsParam":
        min_noise = 1 / (2 ** max_bits - 1)
        max_noise = 1 / (2 ** min_bits - 1)
        return cls(PARAM_MODES[param], float(min_bits), float(max_bits),
                   math.log(min_noise), math.log(max_noise))


def bits_from_logit(logit: torch.Tensor, prm: BitsParam) -> torch.Tensor:
    """Differentiable bits from logits, in torch (the reference formula)."""
    t = torch.sigmoid(logit)
    if prm.mode == PARAM_MODES["noise"]:
        noise_scale = torch.exp(t * prm.log_min_noise + (1 - t) * prm.log_max_noise)
        return torch.log2(1 + 1 / noise_scale)
    return prm.max_bits * t + (1 - t) * prm.min_bits


# --------------------------------------------------------------- noise


def _derive_seed(base: int, index: int) -> int:
    """Independent 64-bit seeds for each parameter of one forward (splitmix64)."""
    z = (base + 0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def draw_seed(generator: tp.Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from torch's generator, so torch.manual_seed replays a run."""
    return int(torch.randint(0, 2 ** 63 - 1, (), generator=generator).item())


def _empty_f32(shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


Alloc = tp.Callable[[tp.Sequence[int]], torch.Tensor]


class _NoisyWeight(torch.autograd.Function):
    """noisy = p + (max(p) - min(p)) * step(bits(logit)) * noise(seed).

    Only the seed is kept for backward: the noise is regenerated there, so no
    noise tensor lives between forward and backward."""

    @staticmethod
    def forward(ctx, p, logit, group_size, kind, seed, prm, name, alloc):
        p_flat = _flat(p)
        logit_flat = _flat(logit)
        noisy = alloc(p.shape)
        rng = _C.noise_forward(p_flat, logit_flat, noisy.view(-1), group_size, kind, seed,
                               tuple(prm), num_threads())
        if rng[4]:
            raise ValueError(f"parameter {name!r} holds {rng[4]} non-finite values "
                             "(NaN or inf); cannot add quantization noise")
        ctx.save_for_backward(p, logit)
        ctx.config = (group_size, kind, seed, prm, rng)
        ctx.alloc = alloc
        return noisy

    @staticmethod
    def backward(ctx, grad):
        p, logit = ctx.saved_tensors
        group_size, kind, seed, prm, rng = ctx.config
        grad_logit = ctx.alloc(logit.shape)
        if _owned_by_autograd(grad):
            # d(noisy)/dp is the identity but at the extrema: update the
            # incoming gradient there rather than copying it whole
            grad_p, out = grad, None
        else:
            grad_p = torch.empty(p.shape, dtype=torch.float32)
            out = grad_p.view(-1)
        _C.noise_backward(_flat(grad), _flat(p), _flat(logit), out, grad_logit.view(-1),
                          group_size, kind, seed, tuple(prm), rng, num_threads())
        return grad_p, grad_logit, None, None, None, None, None, None


# references to a gradient nobody else holds, seen from _owned_by_autograd:
# the engine's argument, backward's local, this call's argument, getrefcount's
_FREE_GRAD_REFS = 6


def _owned_by_autograd(grad: torch.Tensor) -> bool:
    """Whether `grad` is a dense buffer that only the autograd engine holds,
    so writing into it cannot be seen elsewhere: a contiguous float32 CPU
    tensor spanning all its storage (not a slice or an expanded scalar), not
    part of a double-backward graph, and with no Python reference besides
    this call's (a hook that kept it would add one)."""
    return (grad.device.type == "cpu" and grad.dtype == torch.float32
            and grad.is_contiguous() and grad.storage_offset() == 0
            and grad.untyped_storage().nbytes() == grad.numel() * 4
            and not grad.requires_grad
            and sys.getrefcount(grad) <= _FREE_GRAD_REFS)


def _noisy_weight_torch(p, logit, group_size, noise, prm, generator=None):
    """The same formula with torch's RNG (or `generator`), for devices and
    dtypes the kernels do not take."""
    bits = bits_from_logit(logit, prm)[:, None]
    rows = p.reshape(1 if group_size == 0 else -1, p.numel() if group_size == 0 else group_size)
    scale = rows.max() - rows.min()
    step = 1 / (2 ** bits - 1)
    if generator is None:
        source = torch.rand_like(rows) if noise == "uniform" else torch.randn_like(rows)
    else:
        draw = torch.rand if noise == "uniform" else torch.randn
        source = draw(rows.shape, generator=generator, device=generator.device,
                      dtype=rows.dtype).to(rows.device)
    source = source - 0.5 if noise == "uniform" else source / 2
    return (rows + scale * step * source).view_as(p)


def noisy_weight(p: torch.Tensor, logit: torch.Tensor, group_size: int, noise: str,
                 prm: BitsParam, seed: int, name: str = "?",
                 generator: tp.Optional[torch.Generator] = None,
                 alloc: tp.Optional[Alloc] = None) -> torch.Tensor:
    """The weight with pseudo quantization noise, differentiable in p and logit.
    The kernels derive the noise from `seed`; the torch path draws it from
    `generator` (torch's global one when None). `alloc(shape)` gives the
    kernels' float32 output (a fresh tensor when None)."""
    if on_kernel_path(p, logit):
        return _NoisyWeight.apply(p, logit, group_size, NOISE_KINDS[noise], seed, prm, name,
                                  alloc or _empty_f32)
    if not torch.isfinite(p).all():
        raise ValueError(f"parameter {name!r} holds non-finite values (NaN or inf); "
                         "cannot add quantization noise")
    return _noisy_weight_torch(p, logit, group_size, noise, prm, generator)


# ---------------------------------------------------------------- size


class _WeightedSumBits(torch.autograd.Function):
    """sum_i weight_i * sum(bits(logit_i)) over many logits in one autograd
    node (one per parameter costs more than the sums of small logits); the
    largest bits of each logit go to `extra`."""

    @staticmethod
    def forward(ctx, prm, weights, extra, allocs, *logits):
        total = 0.0
        for weight, logit in zip(weights, logits):
            bits_sum, top = _C.size_forward(_flat(logit), tuple(prm), num_threads())
            total += weight * bits_sum
            extra.append(top)
        ctx.save_for_backward(*logits)
        ctx.prm, ctx.weights, ctx.allocs = prm, weights, allocs
        return torch.tensor(total, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grad = float(grad)
        grads = []
        for weight, logit, alloc in zip(ctx.weights, ctx.saved_tensors, ctx.allocs):
            out = alloc(logit.shape)
            _C.size_backward(_flat(logit), out.view(-1), grad * weight, tuple(ctx.prm), num_threads())
            grads.append(out)
        return (None, None, None, None, *grads)


def weighted_sum_bits(logits: tp.Sequence[torch.Tensor], weights: tp.Sequence[float],
                      prm: BitsParam, allocs: tp.Optional[tp.Sequence[Alloc]] = None
                      ) -> tp.Optional[tp.Tuple[torch.Tensor, tp.List[float]]]:
    """(sum_i weights[i] * sum(bits(logits[i])), differentiable; the max
    bits of each logit), or None when the kernels cannot take the logits.
    `allocs[i](shape)` gives the gradient of logits[i]."""
    if not logits or not on_kernel_path(*logits):
        return None
    if allocs is None:
        allocs = [_empty_f32] * len(logits)
    extra: tp.List[float] = []
    total = _WeightedSumBits.apply(prm, tuple(float(w) for w in weights), extra, tuple(allocs),
                                   *logits)
    return total, extra


def sum_bits(logit: torch.Tensor, prm: BitsParam) -> tp.Tuple[torch.Tensor, float]:
    """(sum of bits over the logits, differentiable; max bits as a float)."""
    kernels = weighted_sum_bits([logit], [1.0], prm)
    if kernels is not None:
        total, tops = kernels
        return total, tops[0]
    bits = bits_from_logit(logit, prm)
    return bits.sum(), bits.max().item()


# ------------------------------------------------------------ quantize


def _torch_levels(p: torch.Tensor, bits: torch.Tensor, mn: float, mx: float) -> torch.Tensor:
    """Levels by the float32 formula, for anything the kernels do not take
    (other devices or dtypes, fractional or broadcast bits)."""
    if mx == mn:
        return torch.zeros_like(p)
    step = 1 / ((2 ** bits.float()).long() - 1)
    return ((p - mn) / (mx - mn) / step).round()


def _row_bits(p: torch.Tensor, bits: torch.Tensor) -> tp.Optional[tp.Tuple[torch.Tensor, int]]:
    """Per-group integer bits as uint8 and the group size, when bits is a
    scalar or one value per row of a 2-D p; None otherwise."""
    if bits.numel() == 1:
        group_size = 0
    elif p.dim() == 2 and bits.shape in ((p.shape[0], 1), (p.shape[0],)):
        group_size = p.shape[1]
    else:
        return None
    b = bits.detach().reshape(-1).cpu()
    if b.is_floating_point():
        if not torch.equal(b, b.round()):
            return None
    if b.numel() and (b.min() < 1 or b.max() > 15):
        return None
    return b.to(torch.uint8).contiguous(), group_size


def quantize_levels(p: torch.Tensor, bits: torch.Tensor, name: str = "?"):
    """Levels in [0, 2^bits - 1] over the tensor's range, and (min, max).
    Levels are uint8 when every bits value is <= 8, else int16."""
    bits = torch.as_tensor(bits)
    if p.numel() == 0:
        raise ValueError(f"parameter {name!r} is empty; nothing to quantize")
    if bits.numel() and ((bits < 1).any() or (bits > 15).any()):
        raise ValueError(f"bits for {name!r} must lie in 1..15")
    small = bool((bits <= 8).all())
    rows = _row_bits(p, bits) if on_kernel_path(p) else None
    if rows is None:
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} holds non-finite values (NaN or inf); "
                             "cannot quantize it")
        mn, mx = p.min().item(), p.max().item()
        levels = _torch_levels(p, bits, mn, mx)
        return (levels.byte() if small else levels.short()), (mn, mx)
    b, group_size = rows
    flat = _flat(p)
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    levels = torch.empty(p.shape, dtype=torch.uint8 if small else torch.int16)
    _C.quantize(flat, b, levels.view(-1), group_size, mn, float(mx - mn), num_threads())
    return levels, (mn, mx)


def _check_scales(scales, name: str) -> tp.Tuple[float, float]:
    """(min, max) of a quantized tensor as two finite floats, min <= max."""
    try:
        if len(scales) != 2:
            raise ValueError
        mn, mx = float(scales[0]), float(scales[1])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"quantized state of {name!r}: scales must be (min, max), got "
                         f"{scales!r}") from None
    if not (math.isfinite(mn) and math.isfinite(mx) and mn <= mx):
        raise ValueError(f"quantized state of {name!r}: scales must be finite with "
                         f"min <= max, got ({mn}, {mx})")
    return mn, mx


def _dequantize_plan(levels, scales, bits, name):
    """(min, max, kernel (bits uint8, group_size) or None) for dequantizing,
    after the checks that need no pass over the levels."""
    if not isinstance(levels, torch.Tensor):
        raise TypeError(f"quantized state of {name!r}: levels must be a tensor, "
                        f"got {type(levels).__name__}")
    mn, mx = _check_scales(scales, name)
    bits = torch.as_tensor(bits)
    rows = None
    if _C is not None and levels.device.type == "cpu" and levels.dtype in (torch.uint8, torch.int16):
        rows = _row_bits(levels, bits)
    if rows is None and (levels.dtype.is_floating_point or levels.dtype.is_complex
                         or levels.dtype == torch.bool):
        raise TypeError(f"quantized state of {name!r}: levels must be integers, got {levels.dtype}")
    return mn, mx, bits, rows


def check_levels(levels: torch.Tensor, scales: tp.Tuple[float, float], bits: torch.Tensor,
                 name: str = "?") -> None:
    """Raise what dequantize_levels would raise, without computing anything:
    levels outside [0, 2^bits), bits outside 1..15, non-finite scales."""
    mn, mx, bits, rows = _dequantize_plan(levels, scales, bits, name)
    if rows is not None:
        try:
            _C.validate_levels(_flat(levels), rows[0], rows[1])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"quantized state of {name!r}: {exc}") from None
        return
    if bits.numel() and (bool((bits < 1).any()) or bool((bits > 15).any())):
        raise ValueError(f"quantized state of {name!r}: bits must lie in 1..15")
    top = (2 ** bits.float()).floor() - 1
    if levels.numel() and (bool((levels < 0).any()) or bool((levels.float() > top).any())):
        raise ValueError(f"quantized state of {name!r}: levels outside [0, 2^bits)")


def dequantize_levels(levels: torch.Tensor, scales: tp.Tuple[float, float],
                      bits: torch.Tensor, name: str = "?",
                      out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 weights back from levels: level * step * (max - min) + min,
    written into `out` when it is a contiguous float32 CPU tensor of the
    levels' size (restores write straight into the parameter). Levels and
    scales may come from a state on disk: levels outside [0, 2^bits) and
    non-finite scales are refused."""
    mn, mx, bits, rows = _dequantize_plan(levels, scales, bits, name)
    if rows is None:
        check_levels(levels, scales, bits, name)
        step = 1 / (2 ** bits.float() - 1)
        value = levels.float() * step * (mx - mn) + mn
        if out is not None:
            out.copy_(value.view_as(out))
            return out
        return value
    b, group_size = rows
    if out is None or not (out.device.type == "cpu" and out.dtype == torch.float32
                           and out.is_contiguous() and out.numel() == levels.numel()):
        target = torch.empty(levels.shape, dtype=torch.float32)
    else:
        target = out
    try:
        _C.dequantize(_flat(levels), b, target.view(-1), group_size, mn, float(mx - mn), num_threads())
    except ValueError as exc:
        raise ValueError(f"quantized state of {name!r}: {exc}") from None
    if out is not None and target is not out:
        out.copy_(target.view_as(out))
        return out
    return target


# ------------------------------------------------------------- bitpack


def pack_lines(values: int) -> int:
    """Lines of diffq's packed layout that `values` values take."""
    return (values + _C.PACK_LINE - 1) // _C.PACK_LINE


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """int16 values in [0, 2^nbits) into diffq's [lines, nbits, 32] int64 layout."""
    flat = _flat(values.to("cpu", torch.int16))
    out = torch.empty(pack_lines(flat.numel()), nbits, _C.PACK_BLOCK, dtype=torch.int64)
    _C.pack_bits(flat, out, nbits, num_threads())
    return out


def unpack_into(packed: torch.Tensor, out: torch.Tensor) -> None:
    """Unpack the first out.numel() values into out (contiguous int16)."""
    _C.unpack_bits(packed.detach().cpu().contiguous(), out.view(-1), num_threads())


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` int16 values of a packed tensor."""
    out = torch.empty(length, dtype=torch.int16)
    _C.unpack_bits(packed.detach().cpu().contiguous(), out, num_threads())
    return out


# ------------------------------------------------- stored bits, grouped packing


def stored_bits(logit: torch.Tensor, prm: BitsParam, extra_bits: float, name: str = "?",
                alloc: tp.Optional[Alloc] = None) -> torch.Tensor:
    """Integer bits stored for each group, uint8 in 1..15:
    clamp(round(extra_bits + bits(logit)), 1, 15), equal to torch's float32
    evaluation of that formula (the sigmoid is torch's own; `alloc(shape)`
    gives the float32 tensor it is written to)."""
    logit = logit.detach()
    if on_kernel_path(logit) and prm.mode == PARAM_MODES["bits"]:
        if alloc is not None:
            t = torch.sigmoid(logit, out=alloc(logit.shape)).view(-1)
        else:
            t = torch.sigmoid(logit).contiguous().view(-1)
        out = torch.empty(t.shape, dtype=torch.uint8)
        _C.stored_bits(t, out, prm.min_bits, prm.max_bits, float(extra_bits), num_threads())
        if logit.numel() and not bool(out.min() > 0):
            raise ValueError(f"bit logits of {name!r} hold non-finite values (NaN)")
        return out.view(logit.shape)
    bits = extra_bits + bits_from_logit(logit, prm)
    if not bool(torch.isfinite(bits).all()):
        raise ValueError(f"bit logits of {name!r} hold non-finite values (NaN)")
    return bits.round().clamp(1, 15).byte()


def requantize(p: torch.Tensor, bits: torch.Tensor, group_size: int,
               name: str = "?", alloc: tp.Optional[Alloc] = None) -> tp.Optional[torch.Tensor]:
    """A new tensor (shape and strides of p) of p's quantized values, in one
    pass: the same numbers as dequantizing its levels; from `alloc(shape)`
    when given. None when the kernels cannot take p (the caller then goes
    the long way)."""
    if not (on_kernel_path(p) and p.is_contiguous() and bits.dtype == torch.uint8):
        return None
    flat = p.view(-1)
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    out = (alloc or _empty_f32)(p.shape)
    _C.requantize(flat, bits.contiguous().view(-1), out.view(-1), group_size, mn, float(mx - mn),
                  num_threads())
    return out


def split_by_width(levels: torch.Tensor, bits: torch.Tensor,
                   group_size: int) -> tp.Tuple[torch.Tensor, tp.List[int]]:
    """One int16 stream per bit width, laid out by increasing width: stream w
    is `levels[bits == w]` (rows of group_size). Returns the streams and the
    length of each."""
    streams = torch.empty(levels.numel(), dtype=torch.int16)
    totals = _C.split_by_width(_flat(levels), _flat(bits.to(torch.uint8)), streams, group_size,
                               num_threads())
    return streams, totals


def quantize_pack(p: torch.Tensor, bits: torch.Tensor, group_size: int, name: str = "?"
                  ) -> tp.Optional[tp.Tuple[tp.List[tp.Optional[torch.Tensor]], tp.List[int], float, float]]:
    """Levels of p (over its own range, widths `bits` per group) packed
    straight into diffq's per-width layout, without the levels in between:
    (packed levels of each width 0..15, None where no group has it; the
    number of values of each width; min; max). The same tensors as
    pack_bits of each stream of split_by_width. None when the kernels cannot
    take p."""
    if not on_kernel_path(p):
        return None
    flat = _flat(p)
    bits = _flat(bits.to(torch.uint8))
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    totals = _C.width_totals(bits, group_size, num_threads())
    outs = [torch.empty(pack_lines(total), w, _C.PACK_BLOCK, dtype=torch.int64) if total else None
            for w, total in enumerate(totals)]
    _C.quantize_pack(flat, bits, outs, group_size, mn, float(mx - mn), num_threads())
    return outs, totals, mn, mx


def pack_widths(widths: torch.Tensor, offset: int) -> torch.Tensor:
    """bitpack.pack(widths - offset) for uint8 widths, without the int16
    copy: diffq's packed bits of a state."""
    flat = _flat(widths)
    lo, hi = torch.aminmax(flat) if flat.numel() else (torch.tensor(offset), torch.tensor(offset))
    if int(lo) < offset:
        raise ValueError(f"widths below the offset {offset}")
    top = int(hi) - offset
    nbits = int(math.ceil(math.log2(1 + top))) if top > 0 else 0
    out = torch.empty(pack_lines(flat.numel()), nbits, _C.PACK_BLOCK, dtype=torch.int64)
    _C.pack_widths(flat, int(offset), out, nbits, num_threads())
    return out


def widths_from_stored(stored: torch.Tensor, offset: int) -> tp.Tuple[torch.Tensor, tp.List[int]]:
    """uint8 widths (stored + offset, each checked to be 1..15) and the
    count of each width, in one pass."""
    flat = _flat(stored.to(torch.int16))
    widths = torch.empty(flat.numel(), dtype=torch.uint8)
    counts = _C.widths_from_stored(flat, int(offset), widths, num_threads())
    return widths, counts


class PackedWidths:
    """Levels of a packed state left packed: packs[w] holds, in diffq's
    [lines, w, 32] layout, the levels of the groups of width w in group
    order (None for widths no group has), bits says which width each group
    has. Read from w bit planes, a level cannot fall outside [0, 2^w): there
    is nothing to check beyond the packs' sizes. `dequantize_into` goes from
    the packs straight to the weights; `materialize()` gives the
    [groups, group_size] int16 levels."""

    def __init__(self, packs: tp.Sequence[tp.Optional[torch.Tensor]], bits: torch.Tensor,
                 counts: tp.Sequence[int], group_size: int):
        self.packs = [None if p is None else p.detach().cpu().contiguous() for p in packs]
        self.bits = bits
        self.counts = list(counts)
        self.group_size = group_size
        self.shape = torch.Size((bits.numel(), group_size))

    def materialize(self) -> torch.Tensor:
        streams = torch.empty(self.bits.numel() * self.group_size, dtype=torch.int16)
        start = 0
        for width, count in enumerate(self.counts):
            values = count * self.group_size
            if values:
                unpack_into(self.packs[width], streams[start:start + values])
            start += values
        return merge_by_width(streams, self.bits, self.group_size)

    def dequantize_into(self, scales, out: torch.Tensor, name: str = "?") -> torch.Tensor:
        """dequantize_levels(materialize(), ...) straight from the packs."""
        mn, mx = _check_scales(scales, name)
        if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            _C.dequantize_packed(self.packs, _flat(self.bits), out.view(-1), self.group_size,
                                 mn, float(mx - mn), num_threads())
            return out
        return dequantize_levels(self.materialize(), scales, self.bits.view(-1, 1), name, out=out)


def merge_by_width(streams: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reverse of split_by_width: int16 levels [groups, group_size]."""
    levels = torch.empty(bits.numel(), group_size, dtype=torch.int16)
    _C.merge_by_width(streams, _flat(bits.to(torch.uint8)), levels.view(-1), group_size,
                      num_threads())
    return levels
