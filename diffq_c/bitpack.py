"""Bit packing of integer levels in diffq's layout, in C.

`pack(x, nbits)` stores values as bit planes in 64-bit words, blocks of 32
values, padded to lines of 64 * 32 values; the result is byte-identical to
diffq 0.2.4's `diffq.bitpack.pack`, and `unpack` reads both.
"""
import math
import typing as tp

import torch

from . import ops

# values per packed line with the default block size of 32
LINE = 64 * 32


def _auto_nbits(x: torch.Tensor) -> int:
    return int(math.ceil(math.log2(1 + int(x.max().item())))) if x.numel() else 0


def _check_values(x: torch.Tensor, nbits: tp.Optional[int]) -> None:
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"pack takes integer values, got {x.dtype}")
    if x.numel():
        lo, hi = int(x.min().item()), int(x.max().item())
        if lo < 0 or hi >= 2 ** 15:
            raise ValueError(f"pack takes values in [0, 2^15), got [{lo}, {hi}]")
        if nbits is not None and hi >= 2 ** nbits:
            raise ValueError(f"value {hi} does not fit in nbits={nbits}")


def _pack_torch(x: torch.Tensor, nbits: int, block_size: int) -> torch.Tensor:
    """Any block size, in torch: word [line, b, j] has bit k set when bit b
    of value line * 64 * block_size + k * block_size + j is set."""
    line = 64 * block_size
    flat = x.reshape(-1).to(torch.int64)
    padded = torch.zeros(-(-flat.numel() // line) * line, dtype=torch.int64)
    padded[:flat.numel()] = flat
    planes = padded.view(-1, 64, block_size)
    shifts = torch.arange(64, dtype=torch.int64).view(1, 64, 1)
    out = torch.empty(planes.shape[0], nbits, block_size, dtype=torch.int64)
    for b in range(nbits):
        # distinct powers of two: their sum is their OR, wrapping into the sign bit at 63
        out[:, b] = (((planes >> b) & 1) << shifts).sum(dim=1)
    return out


def pack(x: torch.Tensor, nbits: int = 0, block_size: int = 32) -> torch.Tensor:
    """Pack non-negative integers below 2^15. nbits=0 picks the smallest width
    that holds the largest value."""
    nbits = int(nbits)
    if nbits < 0 or nbits > 16:
        raise ValueError(f"nbits must be in 0..16, got {nbits}")
    _check_values(x, nbits or None)
    if nbits == 0:
        nbits = _auto_nbits(x)
    if block_size != 32 or not ops.kernels_available():
        return _pack_torch(x.cpu(), nbits, block_size)
    return ops.pack_bits(x, nbits)


def unpack(packed: torch.Tensor, length: tp.Optional[int] = None) -> torch.Tensor:
    """int16 values back from `pack`; `length` trims the padding."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int64 or packed.dim() != 3:
        raise ValueError(f"packed must be a 3-D int64 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    lines, nbits, block_size = packed.shape
    capacity = lines * 64 * block_size
    if length is None:
        length = capacity
    if length < 0 or length > capacity:
        raise ValueError(f"packed holds {capacity} values, {length} were asked for")
    if block_size != 32 or not ops.kernels_available():
        words = packed.cpu().view(lines, 1, nbits, block_size)
        shifts = torch.arange(64, dtype=torch.int64).view(1, 64, 1, 1)
        bits = (words >> shifts) & 1  # [lines, 64, nbits, block]
        weights = (1 << torch.arange(nbits, dtype=torch.int64)).view(1, 1, nbits, 1)
        values = (bits * weights).sum(dim=2).to(torch.int16)
        return values.reshape(-1)[:length]
    return ops.unpack_bits(packed, length)
