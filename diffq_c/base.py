"""What every quantizer shares: finding the parameters to quantize, hooks on
the model, swapping true quantized weights in for eval, and the quantized
state (`quantized`, `float16`, `others`, `meta`)."""
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
import importlib
import io
import math
from multiprocessing import cpu_count
import pickle
import typing as tp
import zlib

import torch

from . import bitpack, ops
from .scratch import Scratch



def _gloo_initialized() -> bool:
    """Whether a torch.distributed process group with the gloo backend is up."""
    dist = torch.distributed
    try:
        return dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
    except Exception:  # noqa: BLE001 - no group, or a backend that cannot say: not gloo
        return False


class BaseQuantizer:
    # constructor arguments not stored in a state's meta: the model, and
    # run-time objects that neither pickle nor load under weights_only
    _STATE_EXCLUDED_KWARGS = ("model", "generator")

    @dataclass
    class _QuantizedParam:
        name: str
        param: torch.nn.Parameter
        module: torch.nn.Module
        # the first _QuantizedParam of the same tensor when it is tied
        # (used twice in the model); its quantized state is shared
        other: tp.Optional[tp.Any]

    def __init__(self, model: torch.nn.Module, min_size: float = 0.01, float16: bool = False,
                 exclude: tp.Optional[tp.List[str]] = [], detect_bound: bool = True):
        self.model = model
        self.min_size = min_size
        self.float16 = float16
        self.exclude = exclude
        self.detect_bound = detect_bound
        self._quantized = False
        self._need_unquantize = None
        self._qparams: tp.List[tp.Any] = []
        self._float16: tp.List[torch.nn.Parameter] = []
        self._others: tp.List[torch.nn.Parameter] = []
        self._rnns: tp.List[torch.nn.RNNBase] = []
        self._saved: tp.List[torch.Tensor] = []  # float values while quantized
        self._full_names: tp.Dict[int, str] = {}
        # every place a small (unquantized) parameter sits: (module, name,
        # parameter), ties included; a compiled eval forward swaps them there
        self._small_sites: tp.List[tp.Tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._small_ties: tp.List[int] = []  # per small site, the first site of its tensor
        # per small site, the quantized parameter of its tensor where that came first
        self._small_owners: tp.List[tp.Any] = []
        self._owners: tp.Optional[tp.List[tp.Any]] = None
        # weight-sized outputs kept between calls (see scratch.py)
        self._scratch = Scratch()
        self._find_params()
        # load_state_dict(..., assign=True) puts new Parameter objects in the
        # modules that load: the quantizer takes them up (_follow_loaded)
        modules = {id(qp.module): qp.module for qp in self._qparams}
        modules.update((id(module), module) for module, _, _ in self._small_sites)
        self._load_handles = [module.register_load_state_dict_post_hook(self._follow_loaded)
                              for module in modules.values()]
        self._pre_handle = self.model.register_forward_pre_hook(self._forward_pre_hook)
        try:
            # the post hook also runs when the forward raises, so a failed
            # forward never leaves noisy or quantized weights in the model
            self._post_handle = self.model.register_forward_hook(self._forward_hook,
                                                                 always_call=True)
        except TypeError:  # torch < 2.1
            self._post_handle = self.model.register_forward_hook(self._forward_hook)

    # ------------------------------------------------------------ discovery

    def _excluded(self, full_name: str, name: str) -> bool:
        return any(fnmatch(full_name, pattern) or fnmatch(name, pattern)
                   for pattern in (self.exclude or []))

    def _find_params(self):
        # min_size is in MB of float32 values
        min_numel = self.min_size * 2 ** 20 // 4
        seen: tp.Dict[int, tp.Any] = {}
        first_site: tp.Dict[int, int] = {}
        for module_name, module in self.model.named_modules():
            if isinstance(module, torch.nn.RNNBase):
                self._rnns.append(module)
            for name, param in list(module.named_parameters(recurse=False)):
                full_name = f"{module_name}.{name}"
                # an empty tensor has no range to quantize, whatever min_size says
                if (param.numel() <= min_numel or param.numel() == 0
                        or self._excluded(full_name, name)):
                    self._small_sites.append((module, name, param))
                    # sites of one tensor share their first site's index
                    self._small_ties.append(first_site.setdefault(id(param), len(self._small_sites) - 1))
                    self._small_owners.append(seen.get(id(param)))
                    if id(param) in seen:
                        continue
                    if self.detect_bound:
                        seen[id(param)] = None
                    (self._float16 if self.float16 else self._others).append(param)
                    continue
                self._registering = full_name.lstrip(".")
                qparam = self._register_param(name, param, module, seen.get(id(param)))
                self._full_names[id(qparam)] = self._registering
                if self.detect_bound:
                    seen[id(param)] = qparam
                self._qparams.append(qparam)

    def _param_name(self, qparam) -> str:
        return self._full_names.get(id(qparam), qparam.name)

    def _unique_qparams(self):
        """The quantized parameters that own their state (not tied copies)."""
        if self._owners is None:
            self._owners = [qp for qp in self._qparams if qp.other is None]
        return self._owners

    def _register_param(self, name, param, module, other):
        return self.__class__._QuantizedParam(name, param, module, other)

    # the attribute of a quantized parameter holding what a subclass
    # registers beside the weight as `<name><suffix>` (DiffQuantizer's logit,
    # LSQ's scale); None where there is nothing
    _EXTRA_ATTR: tp.Optional[str] = None

    def _param_slots(self, qparam) -> tp.List[tp.Tuple[str, str]]:
        """(attribute of qparam, name in its module) of each Parameter a
        quantized parameter holds: its weight, and its extra parameter but on
        a tied copy, whose extra is its owner's (on the owner's module)."""
        slots = [("param", qparam.name)]
        if self._EXTRA_ATTR is not None and qparam.other is None:
            slots.append((self._EXTRA_ATTR, qparam.name + self.suffix))
        return slots

    def _forget_layouts(self) -> None:
        """Drop what was worked out from the Parameter objects, which changed."""
        self.__dict__.pop("_swap_list", None)
        if self._EXTRA_ATTR is not None:
            for qparam in self._qparams:
                if qparam.other is not None:
                    setattr(qparam, self._EXTRA_ATTR, getattr(qparam.other, self._EXTRA_ATTR))

    def _follow_loaded(self, module: torch.nn.Module, incompatible_keys) -> None:
        """After `module` loaded a state dict: where load_state_dict(...,
        assign=True) replaced a Parameter object of ours, take up the new
        one. diffq keeps quantizing, saving and restoring the old ones, so
        an eval forward and a saved state silently ignore what was loaded.
        A load in place (the default) keeps the objects; nothing changes.

        assign=True also makes one Parameter per name, so it unties a tied
        weight. The quantizer was made on the tie (one logit, one state), so
        it is kept, as a load in place keeps it: each tied name gets the
        object of the tensor's first name again (in the model's order). The
        modules load one by one, each then calling this, so the ties are
        made again on every call, from whatever the first names hold."""
        moved = False
        for qparam in self._qparams:
            if qparam.module is module:
                for attr, name in self._param_slots(qparam):
                    new = module._parameters.get(name)
                    if isinstance(new, torch.nn.Parameter) and new is not getattr(qparam, attr):
                        setattr(qparam, attr, new)
                        moved = True
        for index, (site, name, old) in enumerate(self._small_sites):
            new = module._parameters.get(name) if site is module else None
            if isinstance(new, torch.nn.Parameter) and new is not old:
                self._small_sites[index] = (site, name, new)
                moved = True
        if not moved:
            return
        for qparam in self._qparams:
            if qparam.other is not None and qparam.param is not qparam.other.param:
                qparam.param = qparam.module._parameters[qparam.name] = qparam.other.param
        if self.detect_bound:
            for index, (site, name, param) in enumerate(self._small_sites):
                # a tensor's first site comes before its others and keeps its
                # object; where it was quantized there, the quantized one's
                owner, tie = self._small_owners[index], self._small_ties[index]
                first = owner.param if owner is not None else self._small_sites[tie][2]
                if param is not first:
                    site._parameters[name] = first
                    self._small_sites[index] = (site, name, first)
        # _float16 / _others as _find_params lists them: each tensor at its first site
        kept = [p for index, (_, _, p) in enumerate(self._small_sites)
                if not self.detect_bound or (self._small_owners[index] is None and self._small_ties[index] == index)]
        if self.float16:
            self._float16 = kept
        else:
            self._others = kept
        self._forget_layouts()

    # ---------------------------------------------------------------- hooks

    def _forward_pre_hook(self, module, input):
        compiling = ops.compiling()
        if compiling and not ops.compile_follows_hooks():
            ops.refuse_traced_forward()  # before anything is swapped
        if not self.model.training and compiling:
            # a traced eval forward sees the quantized weights as module
            # attributes (as training sees the noisy ones): no `.data` swap,
            # which the tracer cannot follow
            if not self._quantized:
                self._pre_forward_eval_traced()
            return
        if self.model.training:
            self._quantized_state = None
            self.unquantize()
            try:
                swapped = self._pre_forward_train()
            except BaseException:
                # a parameter was refused (non-finite weights) after others
                # were swapped: put every real parameter back
                self._post_forward_train()
                raise
            if swapped:
                self._fix_rnns()
        else:
            if self._need_unquantize is not None:
                raise RuntimeError("eval forward entered twice without finishing: "
                                   "a previous forward raised while quantized")
            self._need_unquantize = self.quantize()

    def _forward_hook(self, module, input, output):
        if not self.model.training and ops.compiling():
            if not self._quantized:
                self._put_back_params()
                if self.float16:
                    for module, name, param in self._small_sites:
                        module._parameters[name] = param
                self._fix_rnns(flatten=False)
            return
        if self.model.training:
            if self._post_forward_train():
                # flattening here would be wasted: the next forward does it
                self._fix_rnns(flatten=False)
        elif self._need_unquantize:
            self._need_unquantize = None
            self.unquantize()

    def _pre_forward_train(self) -> bool:
        """Before each training forward; True when parameters were swapped."""
        return False

    def _post_forward_train(self) -> bool:
        """After each training forward; True when parameters were swapped back."""
        return False

    def _pre_forward_eval_traced(self) -> None:
        """Eval forward under torch.compile: each parameter's module sees its
        quantized value, through which gradients pass straight to the
        parameter (what the `.data` swap of eager eval amounts to)."""
        values = dict(zip(map(id, self._unique_qparams()), self._quantized_values()))
        for qparam in self._qparams:
            owner = qparam if qparam.other is None else qparam.other
            qparam.module._parameters[qparam.name] = ops.straight_through(qparam.param, values[id(owner)])
        if self.float16:
            for module, name, param in self._small_sites:
                module._parameters[name] = ops.straight_through(
                    param, param.detach().half().to(param.dtype))
        self._fix_rnns(flatten=False)

    def _put_back_params(self) -> bool:
        """Put each quantized parameter back in its module after a forward
        that saw a stand-in (noisy or quantized values)."""
        for qparam in self._qparams:
            qparam.module._parameters[qparam.name] = qparam.param
        return True

    def _fix_rnns(self, flatten=True):
        """RNN modules cache their weights in `_flat_weights`: point it at the
        tensors now in place."""
        for rnn in self._rnns:
            rnn._flat_weights = [getattr(rnn, wn) if hasattr(rnn, wn) else None
                                 for wn in rnn._flat_weights_names]
            if flatten:
                rnn.flatten_parameters()

    # ------------------------------------------------- quantize / unquantize

    def quantize(self):
        """Put the true quantized weights in place, keeping the float ones to
        restore on `unquantize()` (model.train() does it). Returns False when
        already quantized.

        Each parameter is pointed (`.data`) at a new tensor of its quantized
        values and back at its own values on unquantize: no copy of the float
        weights is made and none is written back. The Parameter objects stay
        the same, so the optimizer, tied weights and hooks see no change."""
        if self._quantized:
            return False
        values, laid_out = self._eval_values()
        params = self._swap_params()
        originals = [p.data for p in params]
        if not laid_out:
            values = [self._same_layout(o, v) for o, v in zip(originals, values)]
        if self._float16:
            values = list(values) + [self._same_layout(o, o.half()) for o in originals[len(values):]]
        try:
            for p, value in zip(params, values):
                p.data = value
        except BaseException:
            for p, original in zip(params, originals):
                p.data = original
            raise
        self._saved = originals
        self._quantized = True
        self._fix_rnns()
        return True

    def _swap_params(self) -> tp.List[torch.nn.Parameter]:
        """The parameters quantize() swaps: each owner's, then the float16 ones."""
        if getattr(self, "_swap_list", None) is None:
            self._swap_list = [qp.param for qp in self._unique_qparams()] + list(self._float16)
        return self._swap_list

    @staticmethod
    def _same_layout(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`value` (as many elements as `like`) with the dtype, shape and
        strides of `like`, copied only when they differ."""
        if value.dtype == like.dtype and value.shape == like.shape and (
                like.is_contiguous() and value.is_contiguous() or value.stride() == like.stride()):
            return value
        return torch.empty_like(like).copy_(value.reshape(like.shape))

    def _eval_values(self) -> tp.Tuple[tp.List[torch.Tensor], bool]:
        """_quantized_values(), and whether each already has the dtype, shape
        and strides of its parameter (else quantize() lays them out so)."""
        return self._quantized_values(), False

    def _quantized_values(self) -> tp.List[torch.Tensor]:
        """The quantized values of every quantized parameter, in
        _unique_qparams' order (subclasses compute them in one call)."""
        return [self._quantized_value(qparam) for qparam in self._unique_qparams()]

    def _quantized_value(self, qparam) -> torch.Tensor:
        """A new tensor of the parameter's quantized values (subclasses may
        compute it in one pass)."""
        quantized = self._quantize_param(qparam)
        return self._unquantize_param(qparam, quantized)

    def _restore_saved(self):
        for p, original in zip(self._swap_params(), self._saved):
            p.data = original
        self._saved = []

    @contextmanager
    def enter_quantize(self):
        """Quantized weights inside the block, float weights after it."""
        self.quantize()
        try:
            yield
        finally:
            self.unquantize()

    def unquantize(self):
        """Undo `quantize()`."""
        if not self._quantized:
            return
        if len(self._saved) != len(self._unique_qparams()) + len(self._float16):
            raise RuntimeError("saved weights do not match the quantized parameters")
        self._restore_saved()
        self._quantized = False
        self._fix_rnns()

    # ------------------------------------------------------ per-class hooks

    def _quantize_param(self, qparam) -> tp.Any:
        raise NotImplementedError()

    def _unquantize_param(self, qparam, quantized: tp.Any) -> torch.Tensor:
        raise NotImplementedError()

    def _bit_pack_param(self, qparam, quantized: tp.Any, pack_fn: tp.Any) -> tp.Any:
        return quantized

    def _bit_unpack_param(self, qparam, packed: tp.Any, unpack_fn: tp.Any) -> tp.Any:
        return packed

    # ----------------------------------------------------------- optimizer

    def _add_optimizer_group(self, optimizer, params, what: str, group: dict) -> None:
        """Give the quantizer's own parameters (`what`: bit logits, scales)
        their own group in `optimizer`, once."""
        if self._optimizer_setup:
            raise RuntimeError("setup_optimizer() or no_optimizer() was already called")
        for existing in optimizer.param_groups:
            if any(p is q for p in existing["params"] for q in params):
                raise RuntimeError(f"the optimizer already holds the {what}: create the "
                                   "optimizer before the quantizer, then call setup_optimizer()")
        optimizer.add_param_group(dict(group, params=params))
        self._optimizer_setup = True

    @staticmethod
    def _fused_options(optimizer, params) -> dict:
        """{"fused": True, "foreach": False} when `optimizer` is a plain Adam or
        AdamW that can step `params` with torch's fused kernel, else {}.

        The quantizer's own parameters are as many as the weights (one bit
        logit per weight at group_size=1); torch's default CPU Adam takes
        ~7 passes over them with temporaries, its fused kernel one (6.8x
        faster on 16.8M logits here). Same update rule; results differ from
        the default path by rounding (~1 ulp). The user's own groups are left
        as they are; `fused=False` in setup_optimizer's kwargs opts out. Not
        under an initialized gloo process group (CPU DDP): see below."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return {}
        if _gloo_initialized():
            # torch's gloo backend can abort a process at exit (pytorch/pytorch
            # issue 190489); measured here, fused Adam made it twice as likely
            # (12 of 45 runs of a two-process job against 6 of 45)
            return {}
        if optimizer.defaults.get("differentiable") or "fused" not in optimizer.defaults:
            return {}
        try:
            # private: whatever goes wrong with it means "do not fuse"
            devices = set(importlib.import_module("torch.optim.optimizer")
                          ._get_fused_kernels_supported_devices())
        except Exception:  # noqa: BLE001
            return {}
        if not all(p.device.type in devices and p.dtype in (torch.float32, torch.float64)
                   for p in params):
            return {}
        return {"fused": True, "foreach": False}

    def _require_optimizer(self) -> None:
        if not self._optimizer_setup:
            raise RuntimeError("call setup_optimizer() on your optimizer (or no_optimizer()) "
                               "before training")

    @staticmethod
    def _remove_from_optimizer(optimizer, params) -> None:
        for group in optimizer.param_groups:
            group["params"][:] = [p for p in group["params"] if not any(p is q for q in params)]

    # ------------------------------------------------------------- states

    @staticmethod
    def _pack_fns(torch_pack: bool):
        if torch_pack:
            from . import torch_pack as torch_pack_mod
            return torch_pack_mod.pack, torch_pack_mod.unpack
        return bitpack.pack, unpack_state

    def get_quantized_state(self, packed=True, torch_pack=False):
        """The quantized weights, bit-packed when `packed` (with the
        TorchScript-friendly torch_pack layout when `torch_pack`), small
        parameters as float16 or float32, and what is needed to rebuild the
        quantizer (`meta`). Restore with `restore_quantized_state`."""
        pack_fn = self._pack_fns(torch_pack)[0]
        all_quantized = self._quantized_states(packed, pack_fn)
        kwargs = dict(self._init_kwargs)
        for key in self._STATE_EXCLUDED_KWARGS:
            kwargs.pop(key, None)
        return {
            "quantized": all_quantized,
            "float16": [p.data.half() for p in self._float16],
            "others": [p.data.clone() for p in self._others],
            "meta": {
                "init_kwargs": kwargs,
                "klass": self.__class__,
                "packed": packed,
                "torch_pack": torch_pack,
            },
        }

    def _quantized_states(self, packed: bool, pack_fn) -> tp.List[tp.Any]:
        """state['quantized']: one entry per quantized parameter (subclasses
        may compute them all in one call)."""
        return [self._quantized_state_of(qparam, packed, pack_fn) for qparam in self._unique_qparams()]

    def _quantized_state_of(self, qparam, packed: bool, pack_fn) -> tp.Any:
        """One parameter's entry of state['quantized'] (subclasses may go
        straight to the packed form)."""
        quantized = self._quantize_param(qparam)
        if packed:
            quantized = self._bit_pack_param(qparam, quantized, pack_fn=pack_fn)
        return quantized

    def _check_state(self, state) -> None:
        if not isinstance(state, dict) or "quantized" not in state:
            raise ValueError("not a quantized state: expected a dict with a 'quantized' entry")
        for key, params in (("quantized", self._unique_qparams()), ("float16", self._float16),
                            ("others", self._others)):
            entries = state.get(key, [])
            if not isinstance(entries, (list, tuple)):
                raise ValueError(f"state[{key!r}] must be a list, got {type(entries).__name__}")
            got = len(entries)
            if got != len(params):
                raise ValueError(f"state has {got} {key!r} tensors, the model has {len(params)}: "
                                 "is it a state of another model or quantizer setting?")
        for kind, params in (("float16", self._float16), ("others", self._others)):
            for i, (p, q) in enumerate(zip(params, state[kind])):
                if not isinstance(q, torch.Tensor) or q.shape != p.shape:
                    shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
                    raise ValueError(f"state[{kind!r}][{i}] has shape {shape}, "
                                     f"the parameter has {tuple(p.shape)}")

    def restore_quantized_state(self, state) -> None:
        """Load a quantized state (ours or diffq's) into the model. Everything
        is decoded and checked before any weight changes, so a bad state
        raises and leaves the model as it was."""
        self._check_state(state)
        meta = state.get("meta", {})
        unpack_fn = self._pack_fns(meta.get("torch_pack", False))[1]
        prepared = []
        for qparam, quantized in zip(self._unique_qparams(), state["quantized"]):
            name = self._param_name(qparam)
            try:
                if meta.get("packed", False):
                    quantized = self._bit_unpack_param(qparam, quantized, unpack_fn)
                prepared.append(self._prepare_restore(qparam, quantized))
            except (ValueError, TypeError, RuntimeError, IndexError, KeyError,
                    AttributeError) as exc:
                raise ValueError(f"cannot restore parameter {name!r}: {exc}") from exc
        plain_values = self._plain_values(state)
        for qparam, ready in zip(self._unique_qparams(), prepared):
            self._apply_restore(qparam, ready)
        self._write_plain_values(plain_values)

    def _plain_values(self, state) -> tp.List[torch.Tensor]:
        """The state's float16 and other parameters converted to their
        parameters' dtype and device, before any write: a tensor that cannot
        become the parameter (meta device, complex) must not leave a
        half-restored model."""
        plain_values = []
        for kind, params in (("float16", self._float16), ("others", self._others)):
            for i, (p, q) in enumerate(zip(params, state[kind])):
                try:
                    plain_values.append(q.to(p))
                except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                    raise ValueError(f"state[{kind!r}][{i}] cannot be loaded into its "
                                     f"parameter: {exc}") from exc
        return plain_values

    def _write_plain_values(self, plain_values: tp.List[torch.Tensor]) -> None:
        """The last step of a restore, once the quantized ones are written."""
        for p, value in zip(self._float16 + self._others, plain_values):
            p.data.copy_(value)
        self._fix_rnns()

    def _prepare_restore(self, qparam, quantized):
        """Everything about restoring one parameter that can fail, done
        before any parameter is written: here, its float value."""
        value = self._unquantize_param(qparam, quantized)
        if value.numel() != qparam.param.numel():
            raise ValueError(f"state holds {value.numel()} values, the parameter has "
                             f"{qparam.param.numel()}")
        return value.view_as(qparam.param)

    def _apply_restore(self, qparam, prepared) -> None:
        """Write what _prepare_restore made into the parameter."""
        qparam.param.data.copy_(prepared)

    def detach(self) -> None:
        """Remove the hooks (and, in subclasses, the extra parameters)."""
        self._pre_handle.remove()
        self._post_handle.remove()
        for handle in self._load_handles:
            handle.remove()
        self._scratch.clear()

    @property
    def reuse_buffers(self) -> bool:
        """Whether the noisy and quantized weights are written into memory
        kept from the previous call (the default; see diffq_c/scratch.py)
        instead of fresh tensors. Setting it False also frees what is kept."""
        return self._scratch.enabled

    @reuse_buffers.setter
    def reuse_buffers(self, value: bool) -> None:
        self._scratch.enabled = bool(value)
        if not value:
            self._scratch.clear()
            # the training plan keeps the last noisy weights' small tensors
            self.__dict__.pop("_plan", None)

    # --------------------------------------------------------------- sizes

    def model_size(self) -> torch.Tensor:
        """Size in MB of what is not quantized: float16 or float32 parameters."""
        bits = 16 * sum(p.numel() for p in self._float16) + 32 * sum(p.numel() for p in self._others)
        return torch.tensor(float(bits)) / 2 ** 20 / 8

    def true_model_size(self) -> float:
        """Size in MB of the quantized model, before any compression."""
        return self.model_size().item()

    def packed_model_size(self) -> float:
        """Size in MB of the pickled packed state."""
        return len(pickle.dumps(self.get_quantized_state(packed=True))) / 2 ** 20

    def compressed_model_size(self, compress_level=-1, num_workers=8) -> float:
        """Size in MB of the unpacked state saved by torch and zlib compressed
        (in `num_workers` chunks compressed in parallel)."""
        buffer = io.BytesIO()
        torch.save(self.get_quantized_state(packed=False), buffer)
        data = buffer.getvalue()
        workers = max(1, min(cpu_count(), num_workers))
        chunk = int(math.ceil(len(data) / workers)) or 1
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        # zlib releases the GIL, so threads compress in parallel
        with futures.ThreadPoolExecutor(workers) as pool:
            total = sum(pool.map(lambda piece: len(zlib.compress(piece, compress_level)), pieces))
        return total / 2 ** 20


def packed_planes(packed: tp.Any) -> tp.Optional[int]:
    """Bit planes of a packed tensor: bitpack's [lines, nbits, 32] or
    torch_pack's [nbits, words]; None for anything else."""
    if isinstance(packed, torch.Tensor):
        if packed.dim() == 3:
            return packed.shape[1]
        if packed.dim() == 2:
            return packed.shape[0]
    return None


def check_packed_state(packed: tp.Any, length: int) -> None:
    """Refuse a packed tensor read from a state unless it is exactly what
    `bitpack.pack` writes for `length` values: an int64 [lines, nbits, 32]
    tensor of ceil(length / 2048) lines whose padding is zeros."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed levels must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int64 or packed.dim() != 3 or packed.shape[2] != 32:
        raise ValueError(f"packed tensor must be int64 [lines, nbits, 32], got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    lines = -(-length // bitpack.LINE)
    if packed.shape[0] != lines:
        raise ValueError(f"packed tensor has {packed.shape[0]} lines, {length} values "
                         f"take {lines}")
    if lines:
        # the padding of the last line must be zeros, as pack writes it
        tail = bitpack.unpack(packed[-1:])[length - (lines - 1) * bitpack.LINE:]
        if bool(tail.any()):
            raise ValueError(f"packed tensor holds non-zero values past the {length} expected")


def unpack_state(packed: tp.Any, length: int, out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """`bitpack.unpack` for a tensor read from a state: it must be exactly
    what `pack` writes for `length` values (an int64 [lines, nbits, 32]
    tensor of ceil(length / 2048) lines, padded with zeros), so that a
    truncated tensor, or one written for another layout or group count, is
    refused rather than decoded into wrong weights. With `out` (a contiguous
    int16 CPU tensor of `length` values) the values are written there."""
    check_packed_state(packed, length)
    if out is not None and ops.kernels_available() and out.dtype == torch.int16 \
            and out.is_contiguous() and out.device.type == "cpu" and out.numel() == length:
        ops.unpack_into(packed, out)
        return out
    values = bitpack.unpack(packed, length)
    if out is not None:
        out.copy_(values.view_as(out))
        return out
    return values


def _our_class(klass):
    """Map a quantizer class saved by diffq (diffq.diffq.DiffQuantizer, ...)
    to ours, so diffq's states restore without diffq installed."""
    module = getattr(klass, "__module__", "") or ""
    if module == "diffq" or module.startswith("diffq."):
        import diffq_c
        ours = getattr(diffq_c, klass.__name__, None)
        if ours is None:
            raise ValueError(f"unknown diffq quantizer class {module}.{klass.__name__}")
        return ours
    return klass


def restore_quantized_state(model: torch.nn.Module, state: dict) -> None:
    """Restore a quantized state into a model without keeping a quantizer
    around: the quantizer named in the state is built, used and detached."""
    if not isinstance(state, dict) or "meta" not in state:
        raise ValueError("state has no 'meta' entry: was it made by get_quantized_state()?")
    meta = state["meta"]
    if not isinstance(meta, dict) or "klass" not in meta:
        raise ValueError("state['meta'] must be a dict naming the quantizer class ('klass')")
    klass = _our_class(meta["klass"])
    # the state chooses what gets called: only a quantizer class, nothing else
    if not (isinstance(klass, type) and issubclass(klass, BaseQuantizer)):
        raise ValueError(f"state['meta']['klass'] is not a quantizer class: {klass!r}")
    init_kwargs = meta.get("init_kwargs", {})
    if not isinstance(init_kwargs, dict):
        raise ValueError("state['meta']['init_kwargs'] must be a dict")
    quantizer = klass(model, **init_kwargs)
    try:
        quantizer.restore_quantized_state(state)
    finally:
        quantizer.detach()
