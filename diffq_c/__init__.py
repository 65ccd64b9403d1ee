"""diffq_c: differentiable model quantization with C kernels.

A drop-in replacement for diffq 0.2.4 (`import diffq_c as diffq`):

- `diffq_c.diffq.DiffQuantizer`: learnt bits by pseudo quantization noise.
- `diffq_c.uniform.UniformQuantizer`: fixed-bit uniform quantization.
- `diffq_c.lsq.LSQ`: learnt step size quantization (Esser et al. 2019).
- `diffq_c.bitpack`: bit packing in diffq's on-disk layout.
- `diffq_c.torch_pack`: the same for TorchScript, in pure torch.
- `diffq_c.ts_export`: export of a quantized model to TorchScript.
- `diffq_c.load`: load a saved state (ours or diffq's) without diffq installed.
- `diffq_c.base.BaseQuantizer` and `restore_quantized_state`.

Quantized states are byte-compatible with diffq's in both directions.
"""
import torch

from . import _openmp  # noqa: F401  (before anything loads _C: it provides its OpenMP runtime)
from .base import BaseQuantizer, restore_quantized_state
from .diffq import DiffQuantizer
from .loading import load
from .lsq import LSQ
from .uniform import UniformQuantizer
from . import ts_export

__version__ = "0.1.0"

_QUANTIZERS = [DiffQuantizer, UniformQuantizer, LSQ]


def _allow_weights_only_load():
    """States name their quantizer class in `meta`; allow ours under
    torch.load's default weights_only=True (torch >= 2.4)."""
    add = getattr(getattr(torch, "serialization", None), "add_safe_globals", None)
    if add is not None:
        add(list(_QUANTIZERS))


_allow_weights_only_load()
