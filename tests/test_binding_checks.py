"""Every entry point of diffq_c._C refuses bad buffers before a kernel runs:
wrong dtype (TypeError), wrong device, size, layout or overlapping outputs
(ValueError), and bad scalars. Refused calls leave their outputs untouched.

The table SPECS has one entry per entry point; a new entry point without one
fails `test_every_entry_point_has_rejection_cases`.
"""
import ctypes
import re
import threading
import typing as tp

import pytest
import torch

from diffq_c import _C

PARAM = (0, 2.0, 15.0, -10.4, -1.1)  # (mode, min_bits, max_bits, log_min_noise, log_max_noise)
N, GS, NG = 24, 4, 6  # elements, group size, groups
SENTINEL = 77

# a dtype of the same shape that each expected dtype must refuse
WRONG_DTYPE = {torch.float32: torch.float64, torch.uint8: torch.int8, torch.int16: torch.int32,
               torch.int64: torch.int32, torch.float64: torch.float32}


class Spec(tp.NamedTuple):
    """How to call one entry point with valid arguments, and what to break."""
    make: tp.Callable[[], dict]       # fresh valid keyword arguments
    tensors: tp.Tuple[str, ...]       # buffer arguments
    outputs: tp.Tuple[str, ...]       # buffers the entry point writes
    any_size: tp.Tuple[str, ...]      # buffers whose size nothing constrains
    overlaps: tp.Tuple[tp.Tuple[str, str], ...]  # (output, other) pairs that must not overlap
    bad_scalars: tp.Tuple[tp.Tuple[dict, type], ...]  # overrides and the error they raise


def _f32(n, lo=-1.0, hi=1.0):
    return torch.linspace(lo, hi, n)


def _levels(n, dtype=torch.int16):
    return (torch.arange(n) % 4).to(dtype)


def _out(n, dtype):
    return torch.full((n,), SENTINEL, dtype=dtype)


def _widths(values=(2, 3, 2, 4, 3, 2)):
    """One bit width per group of GS values (NG groups), for the entry points
    that split, pack or dequantize by width."""
    return torch.tensor(values, dtype=torch.uint8)


# what every entry point taking widths refuses: a 0 and a 16
BAD_WIDTHS = (({"bits": _widths((2, 3, 0, 4, 3, 2))}, ValueError),
              ({"bits": _widths((2, 3, 16, 4, 3, 2))}, ValueError))


def _multi_pack_outs():
    return [_pack_outs()]


def _ranges(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _pack(values, nbits):
    out = torch.zeros(-(-len(values) // 2048), nbits, 32, dtype=torch.int64)
    _C.pack_bits(torch.tensor(values, dtype=torch.int16), out, nbits)
    return out


def _state_bits(extra=None):
    """diffq's packed bits of the widths [2, 3, 2, 4, 3, 2] (offset 2); with
    `extra`, a value past the 6 groups (a padding that is not zeros)."""
    return _pack([0, 1, 0, 2, 1, 0] + ([extra] if extra is not None else []), 2)


def _state_packs():
    """The packed levels of those groups of 4: three groups of 2 bits, two of 3,
    one of 4 (entry w - 1 for width w)."""
    return [None, _pack([1, 2, 3, 0] * 3, 2), _pack([5, 6, 7, 0] * 2, 3), _pack([9, 10, 15, 0], 4)]


def _pack_outs():
    """quantize_pack's outputs for the bits [2, 3, 2, 4, 3, 2] of groups of 4:
    one line of 2, 3 and 4 planes."""
    outs = [None] * 16
    for w in (2, 3, 4):
        outs[w] = torch.full((1, w, 32), SENTINEL, dtype=torch.int64)
    return outs


def _packs():
    """dequantize_packed's input for the bits [2, 3, 2, 4, 3, 2] of groups of
    4: one line of 2, 3 and 4 planes (any bit pattern is valid levels)."""
    packs = [None] * 16
    for w in (2, 3, 4):
        packs[w] = torch.arange(w * 32, dtype=torch.int64).view(1, w, 32)
    return packs


SPECS: tp.Dict[str, Spec] = {
    "philox4x32_10": Spec(
        make=lambda: dict(ctr=(1, 2, 3, 4), key=(5, 6)),
        tensors=(), outputs=(), any_size=(), overlaps=(),
        bad_scalars=(({"ctr": (1, 2, 3, 2 ** 32)}, TypeError), ({"ctr": (-1, 0, 0, 0)}, TypeError),
                     ({"key": (1, 2, 3)}, TypeError), ({"ctr": "abcd"}, TypeError))),
    "noise_fill": Spec(
        make=lambda: dict(out=_out(N, torch.float32), kind=0, seed=3, start=0, nthreads=1),
        tensors=("out",), outputs=("out",), any_size=("out",), overlaps=(),
        bad_scalars=(({"kind": 2}, ValueError), ({"start": -1}, ValueError),
                     ({"start": 2 ** 63 - 2}, ValueError), ({"nthreads": 0}, ValueError),
                     ({"nthreads": 10 ** 6}, ValueError), ({"seed": -1}, TypeError))),
    "value_range": Spec(
        make=lambda: dict(x=_f32(N), nthreads=1),
        tensors=("x",), outputs=(), any_size=("x",), overlaps=(),
        bad_scalars=(({"nthreads": -3}, ValueError),)),
    "noise_forward": Spec(
        make=lambda: dict(p=_f32(N), logit=torch.zeros(NG), noisy=_out(N, torch.float32),
                          group_size=GS, kind=1, seed=9, param=PARAM, nthreads=1),
        tensors=("p", "logit", "noisy"), outputs=("noisy",), any_size=(),
        overlaps=(("noisy", "p"), ("noisy", "logit")),
        bad_scalars=(({"group_size": 5}, ValueError), ({"group_size": -4}, ValueError),
                     ({"kind": -1}, ValueError), ({"param": (7,) + PARAM[1:]}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "noise_backward": Spec(
        make=lambda: dict(grad=_f32(N), p=_f32(N), logit=torch.zeros(NG),
                          grad_p=_out(N, torch.float32), grad_logit=_out(NG, torch.float32),
                          group_size=GS, kind=0, seed=9, param=PARAM,
                          range=(-1.0, 1.0, 1, 1, 0, 0, N - 1), nthreads=1),
        tensors=("grad", "p", "logit", "grad_p", "grad_logit"), outputs=("grad_p", "grad_logit"),
        any_size=(),
        overlaps=(("grad_p", "grad"), ("grad_p", "p"), ("grad_p", "logit"),
                  ("grad_logit", "grad"), ("grad_logit", "p"), ("grad_logit", "logit"),
                  ("grad_logit", "grad_p")),
        bad_scalars=(({"range": (-1.0, 1.0, N + 1, 1, 0, 0, N - 1)}, ValueError),
                     ({"range": (-1.0, 1.0, 1, 1, 0, N, N - 1)}, ValueError),
                     ({"range": (-1.0, 1.0, 1, 1, 0, 0, -2)}, ValueError),
                     ({"range": (-1.0, 1.0, 1, 1, 0)}, TypeError),
                     ({"range": (-1.0, 1.0, 1, -1, 0, 0, N - 1)}, ValueError),
                     ({"group_size": 7}, ValueError), ({"kind": 5}, ValueError),
                     ({"param": (2,) + PARAM[1:]}, ValueError))),
    "logit_to_step": Spec(
        make=lambda: dict(logit=_f32(N), bits=_out(N, torch.float32), step=_out(N, torch.float32),
                          dstep=_out(N, torch.float32), param=PARAM),
        tensors=("logit", "bits", "step", "dstep"), outputs=("bits", "step", "dstep"),
        any_size=(),
        overlaps=(("bits", "logit"), ("step", "logit"), ("dstep", "logit"), ("bits", "step"),
                  ("bits", "dstep"), ("step", "dstep")),
        bad_scalars=(({"param": (-1,) + PARAM[1:]}, ValueError), ({"param": (0, 1.0)}, TypeError))),
    "quantize": Spec(
        make=lambda: dict(p=_f32(N), bits=torch.full((NG,), 8, dtype=torch.uint8),
                          levels=_out(N, torch.int16), group_size=GS, mn=-1.0, range=2.0,
                          nthreads=1),
        tensors=("p", "bits", "levels"), outputs=("levels",), any_size=(),
        overlaps=(("levels", "p"), ("levels", "bits")),
        bad_scalars=(({"bits": torch.tensor([8, 8, 0, 8, 8, 8], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.tensor([8, 8, 16, 8, 8, 8], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.full((NG,), 9, dtype=torch.uint8),
                       "levels": _out(N, torch.uint8)}, TypeError),
                     ({"mn": float("nan")}, ValueError), ({"range": float("inf")}, ValueError),
                     ({"group_size": 5}, ValueError), ({"nthreads": 2000}, ValueError))),
    "dequantize": Spec(
        make=lambda: dict(levels=_levels(N), bits=torch.full((NG,), 3, dtype=torch.uint8),
                          out=_out(N, torch.float32), group_size=GS, mn=-1.0, range=2.0,
                          nthreads=1),
        tensors=("levels", "bits", "out"), outputs=("out",), any_size=(),
        overlaps=(("out", "levels"), ("out", "bits")),
        bad_scalars=(({"levels": _levels(N) + 8}, ValueError),
                     ({"levels": _levels(N) - 1}, ValueError),
                     ({"bits": torch.tensor([3, 3, 3, 0, 3, 3], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.full((NG,), 9, dtype=torch.uint8),
                       "levels": _levels(N, torch.uint8)}, TypeError),
                     ({"mn": float("-inf")}, ValueError), ({"range": float("nan")}, ValueError),
                     ({"group_size": -1}, ValueError))),
    "validate_levels": Spec(
        make=lambda: dict(levels=_levels(N), bits=torch.full((NG,), 3, dtype=torch.uint8), group_size=GS),
        tensors=("levels", "bits"), outputs=(), any_size=(), overlaps=(),
        bad_scalars=(({"levels": _levels(N) + 8}, ValueError), ({"levels": _levels(N) - 1}, ValueError),
                     ({"bits": torch.tensor([3, 3, 3, 0, 3, 3], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.full((NG,), 9, dtype=torch.uint8),
                       "levels": _levels(N, torch.uint8)}, TypeError),
                     ({"group_size": -1}, ValueError), ({"group_size": 5}, ValueError))),
    "pack_bits": Spec(
        make=lambda: dict(x=_levels(N), out=_out(3 * 32, torch.int64), nbits=3, nthreads=1),
        # x sets the number of lines; one more value still fits in the one line
        tensors=("x", "out"), outputs=("out",), any_size=("x",), overlaps=(("out", "x"),),
        bad_scalars=(({"x": _levels(N) * 3}, ValueError), ({"x": _levels(N) - 1}, ValueError),
                     ({"nbits": 17}, ValueError), ({"nbits": -1}, ValueError))),
    "unpack_bits": Spec(
        make=lambda: dict(packed=torch.arange(2 * 3 * 32, dtype=torch.int64).view(2, 3, 32),
                          out=_out(4000, torch.int16), nthreads=1),
        # out may be any size up to what packed holds (beyond: a bad scalar case)
        tensors=("packed", "out"), outputs=("out",), any_size=("out",),
        overlaps=(("out", "packed"),),
        bad_scalars=(({"packed": torch.zeros(2, 3, 31, dtype=torch.int64)}, ValueError),
                     ({"packed": torch.zeros(2, 17, 32, dtype=torch.int64)}, ValueError),
                     ({"packed": torch.zeros(6, 32, dtype=torch.int64)}, ValueError),
                     ({"out": _out(2 * 2048 + 1, torch.int16)}, ValueError))),
    "lsq_effective_scale": Spec(
        make=lambda: dict(scale=0.1, grad_scale=0.01),
        tensors=(), outputs=(), any_size=(), overlaps=(),
        bad_scalars=(({"scale": "a"}, TypeError), ({"grad_scale": None}, TypeError))),
    "lsq_forward": Spec(
        make=lambda: dict(x=_f32(N), scale=0.1, bits=4, q=_out(N, torch.float32),
                          index=_out(N, torch.int16), nthreads=1),
        tensors=("x", "q", "index"), outputs=("q", "index"), any_size=("x",),
        overlaps=(("q", "x"), ("index", "x"), ("index", "q")),
        bad_scalars=(({"bits": 0}, ValueError), ({"bits": 16}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "lsq_backward": Spec(
        make=lambda: dict(x=_f32(N), grad=_f32(N, 0.5, 1.5), scale=0.1, bits=4, bounds=0, grad_scale=0.01,
                          grad_x=_out(N, torch.float32), nthreads=1),
        tensors=("x", "grad", "grad_x"), outputs=("grad_x",), any_size=("x",),
        overlaps=(("grad_x", "x"), ("grad_x", "grad")),
        bad_scalars=(({"bits": 0}, ValueError), ({"bits": 16}, ValueError),
                     ({"bounds": 4}, ValueError), ({"bounds": -1}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "split_by_width": Spec(
        make=lambda: dict(levels=_levels(N), bits=_widths(),
                          streams=_out(N, torch.int16), group_size=GS, nthreads=1),
        tensors=("levels", "bits", "streams"), outputs=("streams",), any_size=(),
        overlaps=(("streams", "levels"), ("streams", "bits")),
        bad_scalars=BAD_WIDTHS + (
            ({"group_size": 0}, ValueError), ({"group_size": 5}, ValueError),
            ({"nthreads": 0}, ValueError))),
    "merge_by_width": Spec(
        make=lambda: dict(streams=_levels(N), bits=_widths(),
                          levels=_out(N, torch.int16), group_size=GS, nthreads=1),
        tensors=("streams", "bits", "levels"), outputs=("levels",), any_size=(),
        overlaps=(("levels", "streams"), ("levels", "bits")),
        bad_scalars=BAD_WIDTHS + (
            ({"group_size": 0}, ValueError), ({"group_size": 5}, ValueError))),
    "dequantize_packed": Spec(
        make=lambda: dict(packs=_packs(), bits=_widths(),
                          out=_out(N, torch.float32), group_size=GS, mn=-1.0, range=2.0, nthreads=1),
        tensors=("bits", "out"), outputs=("out",), any_size=(), overlaps=(("out", "bits"),),
        bad_scalars=BAD_WIDTHS + (
            ({"mn": float("nan")}, ValueError), ({"range": float("inf")}, ValueError),
            ({"group_size": 0}, ValueError), ({"group_size": 5}, ValueError),
            ({"packs": [None] * 15}, ValueError), ({"nthreads": 0}, ValueError))),
    "widths_from_stored": Spec(
        make=lambda: dict(stored=_levels(N), offset=2, widths=_out(N, torch.uint8), nthreads=1),
        tensors=("stored", "widths"), outputs=("widths",), any_size=("stored",),
        overlaps=(("widths", "stored"),),
        bad_scalars=(({"offset": 14}, ValueError), ({"offset": -1}, ValueError),
                     ({"offset": 2 ** 20}, ValueError), ({"nthreads": 0}, ValueError))),
    "width_totals": Spec(
        make=lambda: dict(bits=_widths(), group_size=GS, nthreads=1),
        tensors=("bits",), outputs=(), any_size=("bits",), overlaps=(),
        bad_scalars=(({"bits": torch.tensor([2, 3, 0], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.tensor([2, 16], dtype=torch.uint8)}, ValueError),
                     ({"group_size": 0}, ValueError), ({"group_size": 2 ** 62}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "quantize_pack": Spec(
        make=lambda: dict(p=_f32(N), bits=_widths(),
                          outs=_pack_outs(), group_size=GS, mn=-1.0, range=2.0, nthreads=1),
        tensors=("p", "bits"), outputs=(), any_size=(), overlaps=(),
        bad_scalars=BAD_WIDTHS + (
            ({"mn": float("nan")}, ValueError), ({"range": float("inf")}, ValueError),
            ({"group_size": 0}, ValueError), ({"group_size": 5}, ValueError),
            ({"outs": [None] * 15}, ValueError), ({"nthreads": 0}, ValueError))),
    "pack_widths": Spec(
        make=lambda: dict(widths=torch.full((N,), 5, dtype=torch.uint8), offset=2,
                          out=_out(2 * 32, torch.int64), nbits=2, nthreads=1),
        tensors=("widths", "out"), outputs=("out",), any_size=("widths",), overlaps=(("out", "widths"),),
        bad_scalars=(({"offset": 6}, ValueError), ({"nbits": 1}, ValueError), ({"nbits": 17}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "stored_bits": Spec(
        make=lambda: dict(t=_f32(N, 0.0, 1.0), out=_out(N, torch.uint8), min_bits=2.0, max_bits=15.0,
                          extra_bits=0.0, nthreads=1),
        tensors=("t", "out"), outputs=("out",), any_size=("t",), overlaps=(("out", "t"),),
        bad_scalars=(({"extra_bits": float("nan")}, ValueError), ({"max_bits": float("inf")}, ValueError),
                     ({"nthreads": 0}, ValueError))),
    "requantize": Spec(
        make=lambda: dict(p=_f32(N), bits=torch.full((NG,), 3, dtype=torch.uint8),
                          out=_out(N, torch.float32), group_size=GS, mn=-1.0, range=2.0, nthreads=1),
        tensors=("p", "bits", "out"), outputs=("out",), any_size=("p",),
        overlaps=(("out", "p"), ("out", "bits")),
        bad_scalars=(({"bits": torch.tensor([3, 3, 0, 3, 3, 3], dtype=torch.uint8)}, ValueError),
                     ({"bits": torch.tensor([3, 3, 16, 3, 3, 3], dtype=torch.uint8)}, ValueError),
                     ({"mn": float("nan")}, ValueError), ({"group_size": 5}, ValueError))),
    "size_forward": Spec(
        make=lambda: dict(logit=_f32(N), param=PARAM, nthreads=1),
        tensors=("logit",), outputs=(), any_size=("logit",), overlaps=(),
        bad_scalars=(({"param": (3,) + PARAM[1:]}, ValueError), ({"nthreads": 0}, ValueError))),
    "size_backward": Spec(
        make=lambda: dict(logit=_f32(N), grad=_out(N, torch.float32), scale=0.5, param=PARAM,
                          nthreads=1),
        tensors=("logit", "grad"), outputs=("grad",), any_size=(), overlaps=(("grad", "logit"),),
        bad_scalars=(({"param": (3,) + PARAM[1:]}, ValueError), ({"nthreads": 0}, ValueError))),
    # multi-tensor entry points: a buffer inside a list argument is named by
    # its path, "p[1]", "outs[0][2]", as the binding names it in errors
    "noise_forward_multi": Spec(
        make=lambda: dict(p=[_f32(N), _f32(8)], logit=[torch.zeros(NG), torch.zeros(2)],
                          noisy=[_out(N, torch.float32), _out(8, torch.float32)],
                          group_size=[GS, GS], kind=1, seed=9, param=PARAM,
                          ranges=_out(2 * 7, torch.float64).view(2, 7), nthreads=1,
                          size_stats=_out(4, torch.float64).view(2, 2)),
        tensors=("p[0]", "p[1]", "logit[1]", "noisy[0]", "noisy[1]", "ranges", "size_stats"),
        outputs=("noisy[0]", "noisy[1]", "ranges", "size_stats"), any_size=(),
        overlaps=(("noisy[1]", "p[0]"), ("noisy[0]", "logit[1]"), ("noisy[0]", "noisy[1]"),
                  ("noisy[1]", "p[1]"), ("ranges", "p[0]"), ("ranges", "noisy[1]"),
                  ("size_stats", "ranges"), ("size_stats", "logit[0]")),
        bad_scalars=(({"group_size": [5, GS]}, ValueError), ({"group_size": [GS]}, ValueError),
                     # noisy weights of another shape than their parameter's
                     ({"noisy": [_out(N, torch.float32).view(2, N // 2), _out(8, torch.float32)]}, ValueError),
                     ({"p": [_f32(N)]}, ValueError), ({"kind": -1}, ValueError),
                     ({"param": (7,) + PARAM[1:]}, ValueError), ({"nthreads": 0}, ValueError),
                     ({"seed": -1}, TypeError))),
    "noise_backward_multi": Spec(
        make=lambda: dict(grad=[_f32(N), _f32(8)], p=[_f32(N), _f32(8)], logit=[torch.zeros(NG), torch.zeros(2)],
                          grad_p=[_out(N, torch.float32), _out(8, torch.float32)],
                          grad_logit=[_out(NG, torch.float32), _out(2, torch.float32)],
                          group_size=[GS, 4], kind=0, seed=9, index=[0, 1], param=PARAM,
                          ranges=_ranges([(-1.0, 1.0, 1, 1, 0, 0, N - 1), (-1.0, 1.0, 1, 1, 0, 0, 7)]), nthreads=1),
        tensors=("grad[0]", "p[1]", "logit[0]", "grad_p[1]", "grad_logit[0]"),
        outputs=("grad_p[0]", "grad_p[1]", "grad_logit[0]", "grad_logit[1]"), any_size=(),
        overlaps=(("grad_p[0]", "grad[1]"), ("grad_logit[1]", "p[0]"), ("grad_p[1]", "grad_logit[0]"),
                  ("grad_logit[0]", "grad_logit[1]"), ("grad_p[0]", "ranges")),
        bad_scalars=(({"ranges": _ranges([(-1.0, 1.0, N + 1, 1, 0, 0, N - 1), (-1.0, 1.0, 1, 1, 0, 0, 7)])},
                      ValueError),
                     ({"ranges": _ranges([(-1.0, 1.0, 1, 1, 0, 0, N - 1), (-1.0, 1.0, 1, 1, 0, 8, 7)])},
                      ValueError),
                     ({"ranges": torch.zeros(2, 6, dtype=torch.float64)}, ValueError),
                     ({"index": [0, 2]}, ValueError), ({"index": [0]}, ValueError),
                     ({"seed": -1}, TypeError), ({"group_size": [7, 4]}, ValueError),
                     ({"grad": [_f32(N)]}, ValueError), ({"kind": 5}, ValueError),
                     ({"nthreads": 0}, ValueError),
                     # the size penalty's term: one scale a tensor, a float or None
                     ({"size_scale": [0.5]}, ValueError), ({"size_scale": [0.5, "x"]}, TypeError),
                     ({"size_scale": 0.5}, TypeError),
                     # no gradient and no size term: nothing to compute
                     ({"grad": [None, _f32(8)]}, ValueError),
                     # the size term alone writes no grad_p
                     ({"grad": [None, _f32(8)], "size_scale": [0.5, None]}, ValueError))),
    "restore_packed_multi": Spec(
        make=lambda: dict(packs=[_state_packs()], bits=[_state_bits()], out=[_out(N, torch.float32)],
                          group_size=[GS], offset=2, mn=[-1.0], range=[2.0], names=["w"], nthreads=1),
        tensors=("bits[0]", "out[0]", "packs[0][1]", "packs[0][3]"), outputs=("out[0]",), any_size=(),
        overlaps=(("out[0]", "bits[0]"), ("out[0]", "packs[0][2]")),
        bad_scalars=(({"offset": 16}, ValueError), ({"mn": [float("nan")]}, ValueError),
                     ({"range": [-1.0]}, ValueError), ({"names": []}, ValueError),
                     ({"packs": [[None] * 15]}, ValueError), ({"packs": [_state_packs() + [None] * 12]}, ValueError),
                     ({"group_size": [5]}, ValueError), ({"bits": [_state_bits(extra=1)]}, ValueError),
                     ({"offset": 3}, ValueError), ({"nthreads": 0}, ValueError))),
    "dlpack_exchange": Spec(
        make=lambda: dict(on=-1),
        tensors=(), outputs=(), any_size=(), overlaps=(),
        bad_scalars=(({"on": "yes"}, TypeError), ({"on": 2 ** 40}, TypeError))),
    "derive_seed": Spec(
        make=lambda: dict(base=12345, index=3),
        tensors=(), outputs=(), any_size=(), overlaps=(),
        bad_scalars=(({"index": -1}, ValueError), ({"base": -1}, TypeError), ({"base": 2 ** 64}, TypeError))),
    "size_forward_multi": Spec(
        make=lambda: dict(logit=[_f32(N), _f32(5)], param=PARAM, nthreads=1),
        tensors=("logit[0]", "logit[1]"), outputs=(), any_size=("logit[0]", "logit[1]"), overlaps=(),
        bad_scalars=(({"param": (3,) + PARAM[1:]}, ValueError), ({"nthreads": 0}, ValueError),
                     ({"logit": _f32(N)}, TypeError))),
    "size_backward_multi": Spec(
        make=lambda: dict(logit=[_f32(N), _f32(5)], grad=[_out(N, torch.float32), _out(5, torch.float32)],
                          scale=[0.5, 1.0], param=PARAM, nthreads=1),
        tensors=("logit[0]", "grad[0]", "grad[1]"), outputs=("grad[0]", "grad[1]"), any_size=(),
        overlaps=(("grad[1]", "logit[0]"), ("grad[0]", "grad[1]"), ("grad[0]", "logit[0]")),
        bad_scalars=(({"scale": [0.5]}, ValueError), ({"grad": [_out(N, torch.float32)]}, ValueError),
                     ({"param": (3,) + PARAM[1:]}, ValueError), ({"nthreads": 0}, ValueError))),
    # both values in one buffer: p[1]'s first, then p[0]'s
    "quantize_multi": Spec(
        make=lambda: dict(p=[_f32(N), _f32(8)], t=[_f32(NG, 0.0, 1.0), _f32(2, 0.0, 1.0)],
                          bits=_out(NG + 2, torch.uint8), out=[_out(N + 8, torch.float32)],
                          out_index=[0, 0], out_offset=[8, 0], group_size=[GS, GS],
                          min_bits=2.0, max_bits=15.0, extra_bits=0.0, with_totals=False, nthreads=1),
        tensors=("p[0]", "p[1]", "t[1]", "bits", "out[0]"),
        outputs=("bits", "out[0]"), any_size=("out[0]",),
        overlaps=(("out[0]", "p[0]"), ("bits", "t[1]"), ("out[0]", "bits")),
        bad_scalars=(({"extra_bits": float("nan")}, ValueError), ({"max_bits": float("inf")}, ValueError),
                     ({"group_size": [5, GS]}, ValueError), ({"out": [_out(N, torch.float32)]}, ValueError),
                     ({"out_offset": [4, 0]}, ValueError), ({"out_offset": [9, 0]}, ValueError),
                     ({"out_offset": [8, -1]}, ValueError), ({"out_offset": [8]}, ValueError),
                     ({"out_index": [0, 1]}, ValueError), ({"out_index": [0, -1]}, ValueError),
                     ({"bits": [_out(NG, torch.uint8), _out(2, torch.uint8)]}, TypeError),
                     ({"nthreads": 0}, ValueError))),
    "quantize_pack_multi": Spec(
        make=lambda: dict(p=[_f32(N)], bits=[_widths()], outs=_multi_pack_outs(), group_size=[GS],
                          mn=[-1.0], range=[2.0], widths_out=[_out(2 * 32, torch.int64).view(1, 2, 32)],
                          offset=2, nthreads=1),
        tensors=("p[0]", "bits[0]", "outs[0][3]", "widths_out[0]"),
        outputs=("outs[0][2]", "outs[0][3]", "outs[0][4]", "widths_out[0]"),
        any_size=(), overlaps=(("outs[0][3]", "p[0]"), ("outs[0][2]", "outs[0][4]"),
                               ("widths_out[0]", "bits[0]"), ("widths_out[0]", "outs[0][3]")),
        bad_scalars=(({"bits": [_widths((2, 3, 0, 4, 3, 2))]}, ValueError),
                     ({"bits": [_widths((2, 3, 16, 4, 3, 2))]}, ValueError),
                     ({"mn": [float("nan")]}, ValueError), ({"range": [float("inf")]}, ValueError),
                     ({"mn": []}, ValueError), ({"group_size": [5]}, ValueError),
                     ({"outs": [[None] * 15]}, ValueError), ({"nthreads": 0}, ValueError),
                     ({"offset": 3}, ValueError), ({"offset": 16}, ValueError),
                     ({"widths_out": [_out(32, torch.int64).view(1, 1, 32)]}, ValueError),
                     ({"widths_out": []}, ValueError))),
}


def entry_points():
    return sorted(name for name in dir(_C)
                  if not name.startswith("_") and callable(getattr(_C, name)))


# ----------------------------------------------------------- fake buffers


class OtherDevice:
    """A CPU tensor exported through DLPack as if it lived on another device
    (device type 2, CUDA). With `admit_cpu`, __dlpack_device__ lies and says
    CPU, so only the check of the exported capsule can catch it."""

    def __init__(self, tensor: torch.Tensor, admit_cpu: bool = False):
        self.tensor = tensor
        self.admit_cpu = admit_cpu

    def __dlpack_device__(self):
        return (1, 0) if self.admit_cpu else (2, 0)

    def __dlpack__(self, *args, **kwargs):
        capsule = self.tensor.__dlpack__()
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.py_object, ctypes.c_char_p]
        managed = get(capsule, b"dltensor")
        # DLTensor starts with `void *data`, then DLDevice {int32 type, int32 id}
        ctypes.c_int32.from_address(managed + ctypes.sizeof(ctypes.c_void_p)).value = 2
        return capsule


class Misaligned:
    """A tensor exported with its data one byte past an element boundary
    (DLTensor.byte_offset += 1). Never dereferenced when refused."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, *args, **kwargs):
        capsule = self.tensor.__dlpack__()
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.py_object, ctypes.c_char_p]
        managed = get(capsule, b"dltensor")
        # data, device (2 x int32), ndim (int32), dtype (4 bytes), shape,
        # strides, then uint64 byte_offset
        ptr = ctypes.sizeof(ctypes.c_void_p)
        offset_at = managed + ptr + 8 + 4 + 4 + 2 * ptr
        ctypes.c_uint64.from_address(offset_at).value += 1
        return capsule


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
    view = wide[..., 0]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def _resized(t: torch.Tensor) -> torch.Tensor:
    """One element longer; the extra one repeats the first, so a buffer of
    any size stays valid in content."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
    flat[:t.numel()] = t.reshape(-1)
    if t.numel():
        flat[-1] = flat[0]
    return flat


def _call(name, kwargs):
    return getattr(_C, name)(**kwargs)


def _path(arg):
    """("p", (1,)) for "p[1]": a buffer argument, or an entry of a list one."""
    name, rest = re.fullmatch(r"(\w+)((?:\[\d+\])*)", arg).groups()
    return name, tuple(int(i) for i in re.findall(r"\d+", rest))


def _get(kwargs, arg):
    name, index = _path(arg)
    value = kwargs[name]
    for i in index:
        value = value[i]
    return value


def _set(kwargs, arg, value):
    name, index = _path(arg)
    if not index:
        kwargs[name] = value
        return
    holder = kwargs[name]
    for i in index[:-1]:
        holder = holder[i]
    holder[index[-1]] = value


def _outputs_untouched(spec, kwargs, replaced):
    for out in spec.outputs:
        # an output replaced by the case, itself or the list holding it
        if any(out == r or out.startswith(r + "[") for r in replaced):
            continue
        t = _get(kwargs, out)
        assert bool((t == SENTINEL).all()), f"{out} was written by a refused call"


def _expect(name, spec, overrides, error, match=None):
    kwargs = spec.make()
    for arg, value in overrides.items():
        _set(kwargs, arg, value)
    with pytest.raises(error, match=match):
        _call(name, kwargs)
    _outputs_untouched(spec, kwargs, overrides)


# ------------------------------------------------------------------ tests


@pytest.fixture(autouse=True, params=["exchange", "attributes"])
def torch_buffer_path(request):
    """Every test runs both ways the binding reads a torch tensor: through
    torch's DLPack exchange entry, and through the tensor's attributes (its
    fallback when the entry refuses or a check fails, and the only way on a
    torch without the entry)."""
    _C.dlpack_exchange(request.param == "exchange")
    yield request.param
    _C.dlpack_exchange(True)


def test_exchange_entry_is_used_where_torch_has_one(torch_buffer_path):
    has_entry = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    assert _C.dlpack_exchange(-1) == (has_entry and torch_buffer_path == "exchange")


def test_both_paths_read_the_same_buffers():
    """A view, a parameter, an empty and a 0-d tensor give the same results
    either way, and a non-contiguous one is refused either way."""
    base = torch.linspace(-1, 1, 40)
    cases = [base[8:32], torch.nn.Parameter(base.clone()), torch.zeros(0), torch.tensor(2.5)]
    got = {}
    for on in (True, False):
        _C.dlpack_exchange(on)
        got[on] = [_C.value_range(t) for t in cases]
        with pytest.raises(ValueError, match="contiguous"):
            _C.value_range(base.view(4, 10).t())
    assert got[True] == got[False]
    assert got[True][0] == (float(base[8]), float(base[31]), 0)


def test_every_entry_point_has_rejection_cases():
    assert entry_points() == sorted(SPECS), (
        "entry points of diffq_c._C and the rejection table differ: add a Spec for "
        f"{sorted(set(entry_points()) - set(SPECS))}, drop {sorted(set(SPECS) - set(entry_points()))}")
    for name, spec in SPECS.items():
        assert spec.tensors or spec.bad_scalars, name
        assert spec.bad_scalars, f"{name} has no bad scalar case"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_valid_call_succeeds(name):
    """The baseline every rejection case varies: it must pass, so a refusal
    below is caused by the one thing changed."""
    spec = SPECS[name]
    kwargs = spec.make()
    _call(name, kwargs)
    for out in spec.outputs:
        assert not bool((_get(kwargs, out) == SENTINEL).all()), f"{name} did not write {out}"


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].tensors))
def test_wrong_dtype_is_type_error(name):
    spec = SPECS[name]
    for arg in spec.tensors:
        t = _get(spec.make(), arg)
        _expect(name, spec, {arg: t.to(WRONG_DTYPE[t.dtype])}, TypeError, match=re.escape(arg))
        _expect(name, spec, {arg: t.tolist()}, TypeError, match=re.escape(arg))  # not a tensor at all


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].tensors))
def test_wrong_device_is_value_error(name):
    spec = SPECS[name]
    for arg in spec.tensors:
        t = _get(spec.make(), arg)
        _expect(name, spec, {arg: torch.empty(t.shape, dtype=t.dtype, device="meta")},
                ValueError, match=re.escape(arg) + " must be a CPU tensor")
        _expect(name, spec, {arg: OtherDevice(t)}, ValueError, match=re.escape(arg) + " must be a CPU tensor")
        _expect(name, spec, {arg: OtherDevice(t, admit_cpu=True)}, ValueError,
                match=re.escape(arg) + " must be a CPU tensor")


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].tensors))
def test_misaligned_is_value_error(name):
    spec = SPECS[name]
    for arg in spec.tensors:
        t = _get(spec.make(), arg)
        if t.element_size() == 1:
            continue  # bytes are always aligned
        # one spare element so even the shifted view stays inside the storage
        room = torch.zeros(t.numel() + 1, dtype=t.dtype)
        room[:t.numel()] = t.reshape(-1)
        view = room[:t.numel()].view(t.shape)
        _expect(name, spec, {arg: Misaligned(view)}, ValueError, match=re.escape(arg) + " is not aligned")


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].tensors))
def test_non_contiguous_is_value_error(name):
    spec = SPECS[name]
    for arg in spec.tensors:
        t = _get(spec.make(), arg)
        _expect(name, spec, {arg: _non_contiguous(t)}, ValueError, match="contiguous")


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].tensors))
def test_wrong_size_is_value_error(name):
    spec = SPECS[name]
    sized = [a for a in spec.tensors if a not in spec.any_size]
    if not sized:
        # nothing constrains the size of its only buffer: any size is valid
        kwargs = spec.make()
        for arg in spec.tensors:
            _set(kwargs, arg, _resized(_get(kwargs, arg)))
        _call(name, kwargs)
        return
    for arg in sized:
        t = _get(spec.make(), arg)
        _expect(name, spec, {arg: _resized(t)}, ValueError)


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].overlaps))
def test_overlapping_output_is_value_error(name):
    spec = SPECS[name]
    for out, other in spec.overlaps:
        kwargs = spec.make()
        o, i = _get(kwargs, out), _get(kwargs, other)
        size = max(o.numel() * o.element_size(), i.numel() * i.element_size())
        shared = torch.zeros(size, dtype=torch.uint8)
        # both views start at the same byte, so they overlap whatever their sizes
        i_view = shared[:i.numel() * i.element_size()].view(i.dtype).view(i.shape)
        i_view.copy_(i)
        o_view = shared[:o.numel() * o.element_size()].view(o.dtype).view(o.shape)
        _set(kwargs, out, o_view)
        _set(kwargs, other, i_view)
        before = shared.clone()
        with pytest.raises(ValueError, match="overlap"):
            _call(name, kwargs)
        assert torch.equal(shared, before), f"{name}: refused call wrote {out}"
        # a partial overlap (the output starting inside the other buffer)
        if i.numel() * i.element_size() >= 16 and o.element_size() <= 8:
            shared = torch.zeros(size + 8 + o.numel() * o.element_size(), dtype=torch.uint8)
            i_view = shared[:i.numel() * i.element_size()].view(i.dtype).view(i.shape)
            i_view.copy_(i)
            o_view = shared[8:8 + o.numel() * o.element_size()].view(o.dtype).view(o.shape)
            _set(kwargs, out, o_view)
            _set(kwargs, other, i_view)
            with pytest.raises(ValueError, match="overlap"):
                _call(name, kwargs)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_scalars(name):
    spec = SPECS[name]
    for overrides, error in spec.bad_scalars:
        _expect(name, spec, overrides, error)


def test_empty_buffers_are_valid():
    """Zero-size buffers pass the checks whatever their strides (an empty
    tensor has no layout) and the kernels do nothing with them."""
    empty = torch.empty(0, 3).t()
    assert _C.value_range(empty.contiguous().view(-1))[2] == 0
    _C.size_backward(torch.empty(0), torch.empty(0), 1.0, PARAM)
    _C.noise_fill(torch.empty(3, 0).t(), 0, 1)
    _C.unpack_bits(torch.empty(0, 3, 32, dtype=torch.int64), torch.empty(0, dtype=torch.int16))


def test_requires_grad_tensor_is_read_as_its_values():
    """Torch tensors are read through torch's DLPack exchange entry or their
    attributes, not `__dlpack__` (which refuses tensors that require grad): a
    parameter is read as its values, the same as its detached tensor."""
    x = torch.tensor([3.0, -1.0, 2.0], requires_grad=True)
    assert _C.value_range(x) == _C.value_range(x.detach()) == (-1.0, 3.0, 0)


def test_tensor_subclass_goes_through_dlpack():
    """Subclasses of torch.Tensor are not read by attributes (their data_ptr
    may lie, as a FakeTensor's does) but exported by DLPack, with the same
    checks and messages."""

    class Sub(torch.Tensor):
        pass

    x = torch.tensor([3.0, -1.0, 2.0]).as_subclass(Sub)
    assert _C.value_range(x) == (-1.0, 3.0, 0)
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        _C.value_range(torch.zeros(3, dtype=torch.float64).as_subclass(Sub))
    with pytest.raises(TypeError, match="x cannot be read"):
        _C.value_range(torch.zeros(3, requires_grad=True).as_subclass(Sub))


@pytest.mark.parametrize("reference", [False, True])
def test_zero_plane_packed_tensor_claiming_huge_line_count_returns_at_once(reference):
    """A [2^50, 0, 32] tensor holds no words, so any line count is a valid
    shape. Unpacking must walk only the lines holding the values asked for;
    walking the claimed lines would take days (a denial of service)."""
    packed = torch.empty(2 ** 50, 0, 32, dtype=torch.int64)
    out = torch.full((5,), 3, dtype=torch.int16)
    worker = threading.Thread(target=_C.unpack_bits, args=(packed, out),
                              kwargs={"reference": reference}, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "unpack_bits walks the claimed lines"
    assert torch.equal(out, torch.zeros(5, dtype=torch.int16))


def test_quantize_pack_checks_each_packed_output():
    """outs is a list: each entry is checked like a buffer argument (dtype,
    size, layout, overlap, None exactly where a width has no values), and
    a refused call writes none of them."""
    def bad(mutate, error=ValueError, match=None):
        kwargs = SPECS["quantize_pack"].make()
        mutate(kwargs)
        with pytest.raises(error, match=match):
            _C.quantize_pack(**kwargs)
        for o in kwargs["outs"]:
            if isinstance(o, torch.Tensor) and o.dtype == torch.int64 and o.numel() >= 64:
                assert bool((o.reshape(-1)[:64] == SENTINEL).all()), "a refused call wrote an output"

    def setter(w, value):
        return lambda kw: kw["outs"].__setitem__(w, value(kw) if callable(value) else value)

    bad(setter(3, None), match=r"outs\[3\] is None")
    bad(setter(5, torch.full((1, 5, 32), SENTINEL, dtype=torch.int64)), match=r"outs\[5\] must be None")
    bad(setter(3, torch.full((1, 3, 32), SENTINEL, dtype=torch.int32)), TypeError, match=r"outs\[3\]")
    bad(setter(3, torch.full((2, 3, 32), SENTINEL, dtype=torch.int64)), match=r"outs\[3\]")
    bad(setter(3, _non_contiguous(torch.full((1, 3, 32), SENTINEL, dtype=torch.int64))), match=r"outs\[3\]")
    def overlapping(kw):
        base = torch.full((7 * 32,), SENTINEL, dtype=torch.int64)
        kw["outs"][3] = base[:96].view(1, 3, 32)
        kw["outs"][4] = base[32:160].view(1, 4, 32)

    bad(overlapping, match="overlap")
    bad(lambda kw: kw.__setitem__("p", kw["outs"][2].view(-1).view(torch.float32)[:N]),
        match=r"outs\[2\] must not overlap p")
    bad(setter(3, "not a tensor"), TypeError, match=r"outs\[3\]")
    bad(lambda kw: kw.__setitem__("outs", kw["outs"] + [None]), match="16 entries")
    # the valid call writes every output
    kwargs = SPECS["quantize_pack"].make()
    _C.quantize_pack(**kwargs)
    assert all(not bool((o == SENTINEL).any()) for o in kwargs["outs"] if o is not None)


def test_dequantize_packed_checks_each_pack():
    """packs is a list: each entry a width's groups need is checked (dtype,
    shape with the width's planes, enough lines, layout, overlap with out),
    None there is refused, entries no group reads are ignored; a refused
    call leaves out untouched."""
    def bad(mutate, error=ValueError, match=None):
        kwargs = SPECS["dequantize_packed"].make()
        mutate(kwargs)
        before = kwargs["out"].clone()
        with pytest.raises(error, match=match):
            _C.dequantize_packed(**kwargs)
        assert torch.equal(kwargs["out"].view(torch.int32), before.view(torch.int32)), \
            "a refused call wrote out"

    def setter(w, value):
        return lambda kw: kw["packs"].__setitem__(w, value)

    bad(setter(3, None), match=r"packs\[3\] is None")
    bad(setter(3, torch.zeros(1, 3, 32, dtype=torch.int32)), TypeError, match=r"packs\[3\]")
    bad(setter(3, torch.zeros(1, 4, 32, dtype=torch.int64)), match=r"packs\[3\] must have shape")
    bad(setter(3, torch.zeros(0, 3, 32, dtype=torch.int64)), match=r"packs\[3\] holds 0 lines")
    bad(setter(3, _non_contiguous(torch.zeros(1, 3, 32, dtype=torch.int64))), match=r"packs\[3\]")
    bad(setter(3, "not a tensor"), TypeError, match=r"packs\[3\]")
    bad(lambda kw: kw.__setitem__("out", kw["packs"][4].view(-1).view(torch.float32)[:N]),
        match="overlap")
    # a width no group has is not read: anything goes there
    kwargs = SPECS["dequantize_packed"].make()
    kwargs["packs"][7] = "ignored"
    _C.dequantize_packed(**kwargs)
    assert not bool((kwargs["out"] == SENTINEL).any())
