"""Bit packing in pure torch, usable from TorchScript and on any device.

The layout is diffq's `torch_pack` layout (byte-identical outputs), not the
one of `diffq_c.bitpack`: with S the bits of the storage dtype, the L values
are zero-padded to S * G (G = ceil(L / S)) and read as a [S, G] matrix m of
rows of G consecutive values; the packed tensor has shape [nbits, G] and bit
k of word [b, j] is bit b of m[k, j].

`get_quantized_state(torch_pack=True)` stores its levels this way, and
`diffq_c.ts_export` unpacks them inside TorchScript.
"""
import typing as tp

import torch


def _storage_bits(dtype: torch.dtype) -> int:
    if dtype == torch.int64:
        return 64
    if dtype == torch.int32:
        return 32
    if dtype == torch.int16:
        return 16
    if dtype == torch.uint8:
        return 8
    raise ValueError("storage dtype must be int64, int32, int16 or uint8")


def _bits_needed(value: int) -> int:
    """Bits to hold 0..value, computed exactly (ceil(log2(1 + value)))."""
    nbits = 0
    while (1 << nbits) <= value:
        nbits += 1
    return nbits


def pack(indexes: torch.Tensor, nbits: int = 0,
         storage_dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """Pack non-negative integers below 2^15 on `nbits` bits each (0: as
    many as the largest value needs) into words of `storage_dtype`."""
    if indexes.is_floating_point() or indexes.is_complex() or indexes.dtype == torch.bool:
        raise TypeError("pack takes integer values")
    # UniformQuantizer passes its bits as a float (diffq's own torch_pack
    # fails on that)
    nbits = int(nbits)
    if nbits < 0 or nbits > 15:
        raise ValueError("nbits must be in 0..15")
    storage = _storage_bits(storage_dtype)
    length = indexes.numel()
    if length > 0:
        low = int(indexes.min().item())
        high = int(indexes.max().item())
        if low < 0 or high >= 2 ** 15:
            raise ValueError("pack takes values in [0, 2^15)")
        if nbits == 0:
            nbits = _bits_needed(high)
        elif high >= 2 ** nbits:
            raise ValueError("a value does not fit in nbits")
    groups = (length + storage - 1) // storage
    padded = torch.zeros(storage * groups, dtype=torch.int64, device=indexes.device)
    padded[:length] = indexes.reshape(-1).to(torch.int64)
    rows = padded.view(storage, groups)
    planes = torch.arange(nbits, dtype=torch.int64, device=indexes.device).view(nbits, 1)
    out = torch.zeros(nbits, groups, dtype=storage_dtype, device=indexes.device)
    # row k of the matrix fills bit k of every word, for all bit planes at once
    for k in range(storage):
        out |= ((rows[k].view(1, groups) >> planes) & 1).to(storage_dtype) << k
    return out


def unpack(packed: torch.Tensor, length: tp.Optional[int] = None) -> torch.Tensor:
    """int16 values back from `pack`; `length` trims the padding."""
    storage = _storage_bits(packed.dtype)
    if packed.dim() != 2:
        raise ValueError("packed must be a 2-D tensor [nbits, groups]")
    nbits = packed.shape[0]
    groups = packed.shape[1]
    if nbits > 15:
        raise ValueError("packed holds more than 15 bit planes")
    rows = torch.arange(storage, dtype=torch.int64, device=packed.device).view(storage, 1)
    out = torch.zeros(storage, groups, dtype=torch.int16, device=packed.device)
    for b in range(nbits):
        out |= ((packed[b].to(torch.int64).view(1, groups) >> rows) & 1).to(torch.int16) << b
    values = out.view(-1)
    if length is not None:
        if length < 0 or length > values.numel():
            raise ValueError("length is larger than what packed holds")
        values = values[:length]
    return values
