"""Export of a quantized model to a TorchScript file that keeps the packed
weights and unpacks them on the first forward.

How it works, and why:

- The exported module wraps a copy of the model and holds the packed state
  (torch_pack layout) plus a `List[Tensor]` whose entries are the very
  parameter tensors of the copy. TorchScript keeps that identity through
  save and load (and `.to()`), so the first forward writes the decoded
  weights in place through the list, without naming any attribute. That is
  why an `Optional[Tensor]` attribute such as a conv bias exports fine: it is
  never accessed by name.
- The quantized parameters of the copy are zeroed, and the archive is
  rewritten with deflate, so they cost almost nothing in the file.
- Small parameters kept in float16 (`float16=True`) are stored as float16
  and restored the same way; other small parameters stay in the model.

The model must be scriptable and its forward take one tensor. The model and
quantizer passed in are left untouched (export works on a deep copy).
"""
import copy
import os
from pathlib import Path
import typing as tp
import zipfile

import torch
from torch import Tensor

from .torch_pack import unpack as _unpack_values


def _decode_uniform(packed: Tensor, mn: float, mx: float, bits: float, numel: int) -> Tensor:
    """level * (1 / (2^bits - 1)) * (max - min) + min, in float32, in the
    order the eval model computes it."""
    levels = _unpack_values(packed, numel)
    unit = 1.0 / (torch.pow(torch.full([1], 2.0), bits) - 1.0)
    return levels.float() * unit * (mx - mn) + mn


def _decode_diffq(packed_levels: tp.List[tp.Optional[Tensor]], mn: float, mx: float,
                  packed_bits: Tensor, min_bits: int, groups: int, group_size: int) -> Tensor:
    """DiffQ's grouped levels: one packed tensor per bit width (index + 1),
    the per-group bits packed as bits - min_bits."""
    bits = _unpack_values(packed_bits, groups) + min_bits
    levels = torch.zeros(groups, group_size, dtype=torch.int16)
    for index, packed in enumerate(packed_levels):
        if packed is not None:
            mask = bits == index + 1
            count = int(mask.sum().item())
            levels[mask] = _unpack_values(packed, count * group_size).view(count, group_size)
    unit = 1.0 / (torch.pow(2.0, bits.float()) - 1.0)
    return levels.float() * unit.view(groups, 1) * (mx - mn) + mn


def _decode_lsq(packed: Tensor, scale: Tensor, bits: int, numel: int) -> Tensor:
    """LSQ indexes (stored shifted by 2^(bits-1)) times the scale."""
    index = _unpack_values(packed, numel) - (1 << (bits - 1))
    return index.float() * scale


class _PackedModel(torch.nn.Module):
    """TorchScript wrapper: fills the zeroed parameters of `model` from the
    packed state on the first forward (or an explicit `unpack()`)."""
    # entries of the packed lists start with an index into _targets
    _targets: tp.List[Tensor]
    _uniform: tp.List[tp.Tuple[int, Tensor, float, float, float]]
    _diffq: tp.List[tp.Tuple[int, tp.List[tp.Optional[Tensor]], float, float, Tensor, int, int]]
    _lsq: tp.List[tp.Tuple[int, Tensor, Tensor, int]]
    _half: tp.List[tp.Tuple[int, Tensor]]
    _unpacked: bool

    def __init__(self, model: torch.nn.Module, targets, uniform, diffq, lsq, half):
        super().__init__()
        self.model = model
        self._targets = targets
        self._uniform = uniform
        self._diffq = diffq
        self._lsq = lsq
        self._half = half
        self._unpacked = False

    @torch.jit.export
    def unpack(self):
        """Decode the packed weights into the model (once)."""
        if self._unpacked:
            return
        with torch.no_grad():
            for target_index, packed, mn, mx, bits in self._uniform:
                target = self._targets[target_index]
                value = _decode_uniform(packed, mn, mx, bits, target.numel())
                target.copy_(value.view(target.shape))
            for target_index, packed_levels, mn, mx, packed_bits, min_bits, group_size in self._diffq:
                target = self._targets[target_index]
                groups = target.numel() // group_size
                value = _decode_diffq(packed_levels, mn, mx, packed_bits, min_bits, groups, group_size)
                target.copy_(value.view(target.shape))
            for target_index, packed, scale, bits in self._lsq:
                target = self._targets[target_index]
                value = _decode_lsq(packed, scale, bits, target.numel())
                target.copy_(value.view(target.shape))
            for target_index, half in self._half:
                target = self._targets[target_index]
                target.copy_(half.view(target.shape))
        self._unpacked = True

    def forward(self, x: Tensor):
        self.unpack()
        return self.model(x)


def _param_locations(model: torch.nn.Module) -> tp.Dict[int, tp.Tuple[str, str]]:
    """id(parameter) -> (module path, attribute name), first occurrence."""
    where: tp.Dict[int, tp.Tuple[str, str]] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None and id(param) not in where:
                where[id(param)] = (module_path, name)
    return where


def _copy_without_quantizer(quantizer) -> torch.nn.Module:
    """A deep copy of the model without the quantizer's hooks and extra
    parameters (logits, scales)."""
    model = quantizer.model
    hook_dicts = {"_forward_pre_hooks": quantizer._pre_handle.id,
                  "_forward_hooks": quantizer._post_handle.id}
    saved = {attr: getattr(model, attr) for attr in hook_dicts}
    try:
        for attr, hook_id in hook_dicts.items():
            setattr(model, attr, type(saved[attr])(
                (k, v) for k, v in saved[attr].items() if k != hook_id))
        clone = copy.deepcopy(model)
    finally:
        for attr, hooks in saved.items():
            setattr(model, attr, hooks)
    suffix = getattr(quantizer, "suffix", None)
    if suffix is not None:
        for module in clone.modules():
            for name in [n for n in module._parameters if n.endswith(suffix)]:
                del module._parameters[name]
    return clone


def _kind(quantizer) -> str:
    # by class name, so diffq's own quantizers export too
    for klass in type(quantizer).__mro__:
        if klass.__name__ in ("DiffQuantizer", "UniformQuantizer", "LSQ"):
            return klass.__name__
    raise TypeError(f"cannot export a {type(quantizer).__name__}: expected a DiffQuantizer, "
                    "UniformQuantizer or LSQ")


def _recompress(path: tp.Union[str, Path]) -> None:
    """Rewrite the archive with deflate (torch writes it stored), so the
    zeroed parameters take almost no space."""
    path = str(path)
    tmp = path + ".deflate.tmp"
    try:
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(
                tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export(quantizer, path: tp.Optional[tp.Union[str, Path]]):
    """Script the quantizer's model with its weights packed, save it to
    `path` (unless None) and return the scripted module. Loading needs only
    torch (`torch.jit.load`); diffq_c is not imported by the file."""
    kind = _kind(quantizer)
    state = quantizer.get_quantized_state(packed=True, torch_pack=True)
    owners = [qp for qp in quantizer._qparams if qp.other is None]
    if len(owners) != len(state["quantized"]):
        raise RuntimeError("quantized state does not match the quantizer's parameters")

    where = _param_locations(quantizer.model)
    clone = _copy_without_quantizer(quantizer)

    targets: tp.List[Tensor] = []

    def target_of(param) -> int:
        module_path, name = where[id(param)]
        tensor = clone.get_submodule(module_path)._parameters[name]
        tensor.data.zero_()
        targets.append(tensor)
        return len(targets) - 1

    uniform, diffq, lsq, half = [], [], [], []
    for qparam, packed in zip(owners, state["quantized"]):
        index = target_of(qparam.param)
        if kind == "UniformQuantizer":
            levels, (mn, mx) = packed
            uniform.append((index, levels, float(mn), float(mx), float(quantizer.bits)))
        elif kind == "DiffQuantizer":
            all_levels, (mn, mx), packed_bits = packed
            group_size = quantizer.group_size or qparam.param.numel()
            diffq.append((index, list(all_levels), float(mn), float(mx), packed_bits,
                          int(quantizer.min_bits), int(group_size)))
        else:
            levels, scale = packed
            lsq.append((index, levels, scale.detach().float().reshape(()), int(quantizer.bits)))
    for param in quantizer._float16:
        half.append((target_of(param), param.data.half()))

    scripted = torch.jit.script(_PackedModel(clone, targets, uniform, diffq, lsq, half))
    if path is not None:
        torch.jit.save(scripted, str(path))
        _recompress(path)
    return scripted
