"""Loading saved quantized states, ours or diffq's, without diffq installed.

A state saved by diffq names its quantizer class in `meta` as
`diffq.diffq.DiffQuantizer` (or `diffq.uniform.UniformQuantizer`,
`diffq.lsq.LSQ`), so a plain `torch.load` needs diffq importable, and
`weights_only=True` refuses the class. `load` reads such states with those
names bound to diffq_c's classes, under weights_only rules: nothing but
tensors, containers, plain values and the quantizer classes is accepted.
"""
import collections
import pickle
import types
import typing as tp

import torch

from .diffq import DiffQuantizer
from .lsq import LSQ
from .ops import TORCH_RELEASE
from .uniform import UniformQuantizer

# where diffq 0.2.4 defines each quantizer, and the class that stands for it
_DIFFQ_NAMES = {
    "diffq.diffq.DiffQuantizer": DiffQuantizer,
    "diffq.uniform.UniformQuantizer": UniformQuantizer,
    "diffq.lsq.LSQ": LSQ,
}
_OURS = [DiffQuantizer, UniformQuantizer, LSQ]


def _safe_globals_available() -> bool:
    """Whether torch.load(weights_only=True) takes allowed globals under
    another name, as (class, "module.name") pairs: from torch 2.6 (2.5 has
    safe_globals but only for classes under their own names)."""
    serialization = torch.serialization
    return TORCH_RELEASE >= (2, 6) and all(
        hasattr(serialization, name) for name in ("safe_globals", "add_safe_globals", "get_safe_globals"))


def load(path_or_file: tp.Any, map_location: tp.Any = None) -> tp.Any:
    """`torch.load` of a file saved from `get_quantized_state()`, by diffq_c
    or by diffq, with weights_only rules and without importing diffq. Give
    the result to `diffq_c.restore_quantized_state(model, state)`."""
    if _safe_globals_available():
        wanted = [(klass, name) for name, klass in _DIFFQ_NAMES.items()] + _OURS
        # the context removes what it added on exit: hand it only what is
        # not registered already (diffq_c registers its classes at import)
        present = set(torch.serialization.get_safe_globals())
        with torch.serialization.safe_globals([g for g in wanted if g not in present]):
            return torch.load(path_or_file, map_location=map_location, weights_only=True)
    # torch < 2.6 cannot alias a global name: an unpickler of our own with
    # the same allow-list idea
    return torch.load(path_or_file, map_location=map_location, weights_only=False,
                      pickle_module=_restricted_pickle)


def _allowed_global(module: str, name: str) -> tp.Any:
    full = f"{module}.{name}"
    if full in _DIFFQ_NAMES:
        return _DIFFQ_NAMES[full]
    for klass in _OURS:
        if (klass.__module__, klass.__qualname__) == (module, name):
            return klass
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                             "_rebuild_parameter"):
        return getattr(torch._utils, name)
    if module == "torch" and (name.endswith("Storage")
                              or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return getattr(torch.storage, name)
    if module == "builtins" and name in ("set", "frozenset"):
        return {"set": set, "frozenset": frozenset}[name]
    raise pickle.UnpicklingError(f"diffq_c.load: {full} is not allowed in a quantized state")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _allowed_global(module, name)


_restricted_pickle = types.ModuleType("diffq_c._restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
_restricted_pickle.__dict__["UnpicklingError"] = pickle.UnpicklingError
