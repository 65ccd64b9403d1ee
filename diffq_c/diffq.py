"""Differentiable quantization by pseudo quantization noise (DiffQ).

Each quantized weight group gets a logit that maps to a number of bits. In
training, the weights seen by the forward carry noise of the size of the
quantization step for those bits, so the loss is differentiable in the bits;
`model_size()` is a differentiable size penalty to add to the loss. In eval
the true quantized weights are swapped in.
"""
from dataclasses import dataclass
import math
import typing as tp

import torch

from . import bitpack, ops
from .eval_cache import EvalCache
from .base import BaseQuantizer, check_packed_state, packed_planes, unpack_state
from .utils import QuantizerConfigError, capture_init, simple_repr

MAX_STORED_BITS = 15


def _missing_widths(missing) -> None:
    raise ValueError(f"no packed levels for groups of {missing} bits"
                     + (" (diffq drops 15-bit groups when packing)" if 15 in missing else ""))


class DiffQuantizer(BaseQuantizer):
    @dataclass
    class _QuantizedParam(BaseQuantizer._QuantizedParam):
        logit: torch.nn.Parameter

    @capture_init
    def __init__(self, model: torch.nn.Module, min_size: float = 0.01, float16: bool = False,
                 group_size: int = 1, min_bits: float = 2, max_bits: float = 15,
                 param="bits", noise="gaussian",
                 init_bits: float = 8, extra_bits: float = 0, suffix: str = "_diffq",
                 exclude: tp.List[str] = [], detect_bound: bool = True,
                 generator: tp.Optional[torch.Generator] = None):
        """Differentiable quantizer.

        Args:
            model: the model to quantize; logits are registered on its modules
                as `<name><suffix>` parameters.
            min_size: parameters of at most this size in MB stay unquantized.
            float16: keep those small parameters in float16 rather than float32.
            group_size: weights sharing one number of bits (0: the whole
                tensor). It must divide the size of every quantized parameter.
            min_bits, max_bits: the range of the learnt bits.
            param: "bits" (a sigmoid between min_bits and max_bits) or "noise"
                (the noise scale interpolated in log space).
            noise: "gaussian" (N(0, 1) / 2) or "uniform" (U[-1/2, 1/2)) times
                the quantization step.
            init_bits: the bits every group starts with.
            extra_bits: added to the learnt bits before rounding, for storage.
            suffix: name suffix of the logit parameters.
            exclude: fnmatch patterns of parameter names to leave unquantized.
            detect_bound: quantize a tensor used by several modules only once.
            generator: where the noise seed of each training forward comes
                from (not part of diffq). None draws it from torch's global
                generator, as diffq does; that one is shared by all threads,
                so models trained in parallel threads get seeds in whatever
                order the threads reach it. A generator per quantizer makes
                each run reproducible on its own. It is not saved in states.

        Call `setup_optimizer` (or `no_optimizer`) before training, and use
        model.train() / model.eval(): eval forwards see quantized weights.
        """
        if noise not in ("gaussian", "uniform"):
            raise QuantizerConfigError(f"noise must be 'gaussian' or 'uniform', got {noise!r}")
        if not isinstance(group_size, int) or group_size < 0:
            raise QuantizerConfigError(f"group_size must be an integer >= 0, got {group_size!r}")
        if not min_bits < init_bits < max_bits:
            raise QuantizerConfigError(
                f"init_bits must lie strictly between min_bits and max_bits, got "
                f"min_bits={min_bits}, init_bits={init_bits}, max_bits={max_bits}")
        self.group_size = group_size
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.init_bits = init_bits
        self.extra_bits = extra_bits
        self.suffix = suffix
        self.param = param
        self.noise = noise
        self._optimizer_setup = False
        self._min_noise = 1 / (2 ** self.max_bits - 1)
        self._max_noise = 1 / (2 ** self.min_bits - 1)
        self._bits_param = ops.BitsParam.make("noise" if param == "noise" else "bits",
                                              min_bits, max_bits)
        for name, _ in model.named_parameters():
            if name.endswith(suffix):
                raise RuntimeError(f"the model already has a parameter ending in {suffix!r} "
                                   f"({name}): was a DiffQuantizer applied to it twice?")
        self._generator = generator
        self._eval_cache = EvalCache()
        try:
            super().__init__(model, min_size, float16, exclude, detect_bound)
        except BaseException:
            # a parameter refused midway (group_size) must not leave the logits
            # of the ones before it on the model
            for qparam in getattr(self, "_qparams", []):
                if qparam.other is None and hasattr(qparam.module, qparam.name + suffix):
                    delattr(qparam.module, qparam.name + suffix)
            raise

    # ------------------------------------------------------- bits and logits

    def _get_bits(self, logit: torch.Tensor) -> torch.Tensor:
        """Differentiable bits of each group."""
        return ops.bits_from_logit(logit, self._bits_param)

    def _get_noise_scale(self, logit: torch.Tensor) -> torch.Tensor:
        """The quantization step (relative to the weight range) of each group."""
        if self.param == "noise":
            t = torch.sigmoid(logit)
            return torch.exp(t * math.log(self._min_noise) + (1 - t) * math.log(self._max_noise))
        return 1 / (2 ** self._get_bits(logit) - 1)

    def _init_logit(self) -> float:
        """The logit whose bits are init_bits."""
        if self.param == "noise":
            step = 1 / (2 ** self.init_bits - 1)
            t = ((math.log(step) - math.log(self._max_noise))
                 / (math.log(self._min_noise) - math.log(self._max_noise)))
        else:
            t = (self.init_bits - self.min_bits) / (self.max_bits - self.min_bits)
        # on the CPU whatever the default device (a model built under
        # torch.device("meta") to load with assign=True)
        return float(torch.logit(torch.tensor(float(t), device="cpu")))

    def _group_size_of(self, param: torch.Tensor) -> int:
        return self.group_size or param.numel()

    def _register_param(self, name, param, module, other):
        if other is not None:
            return self.__class__._QuantizedParam(name=name, param=param, module=module,
                                                  other=other, logit=other.logit)
        if self.group_size and param.numel() % self.group_size:
            raise QuantizerConfigError(
                f"parameter {getattr(self, '_registering', name)!r} has {param.numel()} elements, "
                f"not a multiple of group_size={self.group_size}; exclude it or change group_size")
        groups = param.numel() // self.group_size if self.group_size else 1
        logit = torch.nn.Parameter(torch.full((groups,), self._init_logit(), device=param.device))
        module.register_parameter(name + self.suffix, logit)
        return self.__class__._QuantizedParam(name=name, param=param, module=module,
                                              other=None, logit=logit)

    _EXTRA_ATTR = "logit"

    def _forget_layouts(self) -> None:
        super()._forget_layouts()
        for cached in ("_plan", "_eval_lists", "_size_cache", "_large"):
            self.__dict__.pop(cached, None)
        self._eval_cache.clear()

    # ------------------------------------------------------------ optimizer

    def _logits(self):
        # a tied tensor's entries share one logit: list it once, or the
        # optimizer would step it twice (and torch warns of the duplicate)
        return [qp.logit for qp in self._qparams if qp.other is None]

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: float = 1e-3, **kwargs):
        """Add the logits to `optimizer` as their own group: learning rate `lr`
        (1e-3 suits Adam), no weight decay, `kwargs` overriding the rest. With
        Adam or AdamW the group steps with torch's fused kernel where it can
        (see BaseQuantizer._fused_options; `fused=False` opts out)."""
        logits = self._logits()
        group = dict({"lr": lr, "weight_decay": 0}, **self._fused_options(optimizer, logits))
        if kwargs.get("foreach"):
            group.pop("fused", None)
        group.update(kwargs)
        if group.get("fused") is False:
            group.pop("foreach", None)
        self._add_optimizer_group(optimizer, logits, "bit logits", group)

    def no_optimizer(self):
        """Train without learning the bits."""
        self._optimizer_setup = True

    def clear_optimizer(self, optimizer: torch.optim.Optimizer):
        """Remove the logits from every group of `optimizer`."""
        self._remove_from_optimizer(optimizer, self._logits())

    def check_unused(self):
        """Zero the logit gradients of parameters that got no gradient (unused
        in this step), so only the size penalty does not shrink them."""
        for qparam in self._unique_qparams():
            grad = qparam.param.grad
            if (grad is None or not grad.any()) and qparam.logit.grad is not None:
                qparam.logit.grad.data.zero_()

    # ---------------------------------------------------------------- sizes

    def model_size(self, exact=False):
        """Size of the quantized model in MB: differentiable in the logits, or
        with `exact` the size of the rounded bits actually stored."""
        total = super().model_size()
        qparams = self._unique_qparams()
        fused = None if exact else ops.weighted_sum_bits(
            [qp.logit for qp in qparams], self._size_terms()[0], self._bits_param, self._allocs()[1],
            self._link())
        if fused is not None:
            # one autograd node and one kernel call for all the logits; the
            # rest does not depend on them
            weighted, tops = fused
            return total + (weighted + self._size_constant(tops)) / (2 ** 20 * 8)
        subtotal = 0
        for qparam in qparams:
            logit = qparam.logit
            if exact:
                bits = (self.extra_bits + self._get_bits(logit)).round().clamp(1, MAX_STORED_BITS)
                bits_sum, top = bits.sum(), bits.max().item()
            else:
                bits_sum, top = ops.sum_bits(logit, self._bits_param)
                bits_sum = bits_sum + self.extra_bits * logit.numel()
                top = top + self.extra_bits
            subtotal += self._group_size_of(qparam.param) * bits_sum
            subtotal += 2 * 32  # min and max of the tensor
            subtotal += 8 + self._bits_bits(top) * logit.numel()
        subtotal /= 2 ** 20 * 8
        return total + subtotal

    def _size_terms(self):
        """(each parameter's group size as a float, its logits' count, the
        bits of the size that depend on neither logits nor bits: the extra
        bits, each tensor's (min, max) and the width of its stored bits).
        Computed once per setting: a model_size() call per step would
        otherwise walk the parameters for them."""
        key = (self.extra_bits, self.group_size)
        cached = getattr(self, "_size_cache", None)
        if cached is None or cached[0] != key:
            qparams = self._unique_qparams()
            weights = tuple(float(self._group_size_of(qp.param)) for qp in qparams)
            numels = [qp.logit.numel() for qp in qparams]
            base = sum(w * self.extra_bits * n for w, n in zip(weights, numels)) + (2 * 32 + 8) * len(qparams)
            self._size_cache = cached = (key, weights, numels, base)
        return cached[1:]

    def _size_constant(self, tops: torch.Tensor):
        """The bits of a model's size that do not depend on the logits: the
        extra bits, each tensor's (min, max) and its stored bits, each on the
        bits the largest (`tops`) needs."""
        _, numels, constant = self._size_terms()
        if ops.compiling():
            # the same formula in tensor operations, which a trace can hold
            width = torch.ceil(torch.log2(1 + (torch.round(tops + self.extra_bits) - self.min_bits)))
            return constant + (width * torch.tensor(numels, dtype=torch.float64)).sum()
        # _bits_bits by the rounded bits, which take a handful of values
        cache = getattr(self, "_widths", None)
        if cache is None or cache[0] != self.min_bits:
            self._widths = cache = (self.min_bits, {})
        widths, extra, stored = cache[1], self.extra_bits, 0
        for top, n in zip(tops.tolist(), numels):
            rounded = round(top + extra)
            width = widths.get(rounded)
            if width is None:
                width = widths[rounded] = self._bits_bits(rounded)
            stored += width * n
        return constant + stored

    def _link(self) -> ops.SizeLink:
        """The last training forward's link to model_size() (see ops.SizeLink)."""
        link = getattr(self, "_size_link", None)
        if link is None:
            self._size_link = link = ops.SizeLink()
        return link

    def _owner_names(self) -> tp.List[str]:
        """The full name of each parameter of _unique_qparams()."""
        if getattr(self, "_names_list", None) is None:
            self._names_list = [self._param_name(qp) for qp in self._unique_qparams()]
        return self._names_list

    def _allocs(self):
        """Per quantized parameter, what allocates its noisy weight and its
        logits' gradient: kept memory (scratch.py) for the large ones, plain
        torch.empty for the others (the pool's bookkeeping costs more than
        it saves on small tensors)."""
        keep = self._scratch.keep_bytes
        qparams = self._unique_qparams()
        if getattr(self, "_large", None) is None or self._large[0] != keep:
            # which tensors are large, by keep_bytes: (keep, weights, logits)
            self._large = (keep, [qp.param.numel() * 4 >= keep for qp in qparams],
                           [qp.logit.numel() * 4 >= keep for qp in qparams])
        _, weights, logits = self._large
        lend, empty = self._scratch.lender, ops._empty_f32
        return ([lend(id(qp)) if large else empty for qp, large in zip(qparams, weights)],
                [lend(id(qp)) if large else empty for qp, large in zip(qparams, logits)])

    def _bits_bits(self, top: float) -> int:
        """The bits of each group are stored on the bits the largest needs."""
        return math.ceil(math.log2(1 + (round(top) - self.min_bits)))

    def true_model_size(self):
        """Size in MB of the stored model, before compression."""
        return self.model_size(exact=True).item()

    # ------------------------------------------------------------- training

    @property
    def cache_eval(self) -> bool:
        """Whether eval forwards reuse the quantized weights of the previous
        one while weights and logits are unchanged (see eval_cache.py)."""
        return self._eval_cache.enabled

    @cache_eval.setter
    def cache_eval(self, value: bool) -> None:
        self._eval_cache.enabled = bool(value)
        self._eval_cache.clear()

    def clear_eval_cache(self) -> None:
        """Forget the kept quantized weights (after an edit through `.data`)."""
        self._eval_cache.clear()

    def _train_plan(self) -> "_TrainPlan":
        """What a training forward hands the kernels, worked out once: which
        parameters the kernels take, their names, allocators, group sizes
        and size weights, and where each noisy weight goes. Remade when a
        setting changes, and by _pre_forward_train when the binding refuses
        it (a parameter changed device, dtype or layout since)."""
        key = (self.group_size, self.extra_bits, self.noise, self._bits_param, self._scratch.keep_bytes,
               self._scratch.enabled)
        plan = getattr(self, "_plan", None)
        if plan is None or plan.key != key or plan.torch_qps:
            # while some parameters take the torch path, look again each time
            self._plan = plan = _TrainPlan.make(self, key)
        return plan

    def _pre_forward_train(self):
        self._require_optimizer()
        if not ops.compiling():
            self._scratch.release_small()
            self._eval_cache.clear()
        link = self._link()
        link.clear()
        plan = self._train_plan()
        values: tp.List[torch.Tensor] = []
        if plan.kernel_qps:
            # every parameter's noise in one kernel call
            try:
                values = plan.noisy_weights(self, link)
            except ops.KernelRefused as refused:
                # the binding checks every buffer before it writes anything:
                # look at the parameters again and go the careful way, with
                # the same seed (a refusal does not move torch's generator)
                self._plan = None
                plan = self._train_plan()
                values = plan.noisy_weights(self, link, seed=refused.seed) if plan.kernel_qps else []
            except RuntimeError:
                # inside torch.func's transforms (grad, jacrev, ...) the
                # kernels have no memory to work on: diffq's formula in
                # torch operators, as on other devices
                if not ops.transforms_active():
                    raise
                values = [self._torch_noisy_weight(qparam) for qparam in plan.kernel_qps]
        values.extend(self._torch_noisy_weight(qparam) for qparam in plan.torch_qps)
        for qparam, index in plan.sites:
            # bypass nn.Module's check that parameters are leaves
            qparam.module._parameters[qparam.name] = values[index]
        return True

    def _torch_noisy_weight(self, qparam) -> torch.Tensor:
        return ops.noisy_weight(qparam.param, qparam.logit, self.group_size, self.noise, self._bits_param, 0,
                                name=self._param_name(qparam), generator=self._generator, kernels=False)

    def _post_forward_train(self):
        return self._put_back_params()

    # ------------------------------------------------------------ quantized

    def _stored_bits(self, qparam, small_too: bool = False) -> torch.Tensor:
        return ops.stored_bits(qparam.logit, self._bits_param, self.extra_bits,
                               name=self._param_name(qparam),
                               alloc=self._scratch.lender(id(qparam), small_too))

    def _multi_kernels_take(self, owners) -> bool:
        """Whether the multi-tensor kernels quantize these parameters: CPU
        float32 weights and logits, bits mode (the noise mode's stored bits
        go through torch)."""
        # len(), not bool(): torch 2.9's compile cannot trace bool() of a list
        return len(owners) > 0 and self._bits_param.mode == ops.PARAM_MODES["bits"] and all(
            ops.on_kernel_path(qp.param, qp.logit) for qp in owners)

    def _quantized_values(self) -> tp.List[torch.Tensor]:
        return self._eval_values()[0]

    def _eval_values(self) -> tp.Tuple[tp.List[torch.Tensor], bool]:
        owners = self._unique_qparams()
        if not (owners and ops.kernels_available() and self._bits_param.mode == ops.PARAM_MODES["bits"]):
            return super()._quantized_values(), False
        if ops.compiling():
            if not self._multi_kernels_take(owners):
                return super()._quantized_values(), False
            return list(torch.ops.diffq_c.quantize(
                [qp.param.detach() for qp in owners], [qp.logit.detach() for qp in owners],
                [self.group_size] * len(owners), [float(v) for v in self._bits_param],
                float(self.extra_bits), self._owner_names())), False
        ps, logits, both = self._eval_tensors()
        key = self._eval_cache.key(self, both)
        values = self._eval_cache.get(key)
        if values is not None:
            # kept only from the kernels, for tensors of the key's dtype,
            # device and layout: those of now
            return values, True
        # the key holds each tensor's dtype and device: _multi_kernels_take
        # without reading them again
        if not (EvalCache.all_cpu_float32(key) if key is not None else self._multi_kernels_take(owners)):
            return super()._quantized_values(), False
        # let go of the stale values first: large ones are kept memory
        # (scratch.py) that the new values can then take
        self._eval_cache.clear()
        values = ops.quantize_all(ps, logits, [self.group_size] * len(owners), self._bits_param,
                                  self.extra_bits, self._owner_names(), allocs=self._allocs()[0],
                                  shared_values=True, with_bits=False)[0]
        # a non-contiguous weight (channels_last, transposed) gets its
        # layout here, once, rather than on every forward the values serve
        values = [v if p.is_contiguous() else self._same_layout(p.detach(), v) for p, v in zip(ps, values)]
        self._eval_cache.put(key, values)
        return values, True

    def _eval_tensors(self):
        """The weights and logits of _unique_qparams(), and both in one list."""
        if getattr(self, "_eval_lists", None) is None:
            owners = self._unique_qparams()
            ps, logits = [qp.param for qp in owners], [qp.logit for qp in owners]
            self._eval_lists = (ps, logits, ps + logits)
        return self._eval_lists

    def _quantized_value(self, qparam) -> torch.Tensor:
        # eval: quantized on every forward, so small tensors are kept too
        bits = self._stored_bits(qparam, small_too=True)
        value = ops.requantize(qparam.param.data, bits, self.group_size,
                               name=self._param_name(qparam),
                               alloc=self._scratch.lender(id(qparam), small_too=True))
        return value if value is not None else super()._quantized_value(qparam)

    def _quantize_param(self, qparam) -> tp.Any:
        bits = self._stored_bits(qparam)
        rows = qparam.param.data.reshape(-1, self._group_size_of(qparam.param))
        levels, scales = ops.quantize_levels(rows, bits[:, None], name=self._param_name(qparam))
        return levels, scales, bits

    def _check_quantized(self, qparam, quantized: tp.Any) -> None:
        """The layout of one parameter's quantized value (it may come from a
        state on disk): (levels [groups, group_size], (min, max), bits [groups])."""
        if not isinstance(quantized, (tuple, list)) or len(quantized) != 3:
            raise ValueError("expected (levels, scales, bits), got "
                             f"{type(quantized).__name__}"
                             + (f" of length {len(quantized)}" if isinstance(quantized, (tuple, list))
                                else ""))
        levels, _, bits = quantized
        for what, t in (("levels", levels), ("bits", bits)):
            if not isinstance(t, (torch.Tensor, ops.PackedWidths)):
                raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        groups = qparam.logit.numel()
        shape = (groups, self._group_size_of(qparam.param))
        if tuple(levels.shape) != shape:
            raise ValueError(f"levels have shape {tuple(levels.shape)}, expected {shape}")
        if bits.numel() != groups or bits.dim() not in (1, 2):
            raise ValueError(f"bits have shape {tuple(bits.shape)}, expected ({groups},)")

    def _unquantize_param(self, qparam, quantized: tp.Any) -> torch.Tensor:
        self._check_quantized(qparam, quantized)
        levels, scales, bits = quantized
        if isinstance(levels, ops.PackedWidths):
            levels = levels.materialize()
        if bits.dim() == 1:
            bits = bits[:, None]
        value = ops.dequantize_levels(levels, scales, bits, name=self._param_name(qparam))
        return value.view_as(qparam.param.data)

    def restore_quantized_state(self, state) -> None:
        # writes go through .data, which no version counter sees
        self._eval_cache.clear()
        if not self._restore_packed_all(state):
            super().restore_quantized_state(state)

    def _restore_packed_all(self, state) -> bool:
        """A packed state (bitpack layout) restored in one kernel call that
        checks every entry before it writes any. False, having changed
        nothing, when the state or the parameters need the general path
        (which also gives its precise errors for malformed entries)."""
        self._check_state(state)
        meta = state.get("meta", {})
        owners = self._unique_qparams()
        if not (isinstance(meta, dict) and meta.get("packed", False) and not meta.get("torch_pack", False)
                and float(self.min_bits) == int(self.min_bits)
                and all(ops.on_kernel_path(qp.param) and qp.param.is_contiguous() for qp in owners)):
            return False
        storages = {qp.param.untyped_storage().data_ptr() for qp in owners}
        if len(storages) < len(owners):
            # parameters sharing memory (a tie without detect_bound): the
            # general path writes them one after the other, as diffq does
            return False
        packs, bits, mns, ranges, names = [], [], [], [], []
        for qparam, entry in zip(owners, state["quantized"]):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3
                    and isinstance(entry[0], (tuple, list))):
                return False
            all_packed, scales, packed_bits = entry
            name = self._param_name(qparam)
            try:
                mn, mx = ops._check_scales(scales, name)
            except ValueError as exc:
                raise ValueError(f"cannot restore parameter {name!r}: {exc}") from exc
            packs.append(all_packed)
            bits.append(packed_bits)
            mns.append(mn)
            ranges.append(mx - mn)
            names.append(name)
        plain_values = self._plain_values(state)
        try:
            ops.restore_packed_all(packs, bits, [qp.param for qp in owners],
                                   [self._group_size_of(qp.param) for qp in owners], self._bits_offset(),
                                   mns, ranges, names)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        self._write_plain_values(plain_values)
        return True

    def _prepare_restore(self, qparam, quantized):
        # checked now, dequantized straight into the parameter later
        self._check_quantized(qparam, quantized)
        levels, scales, bits = quantized
        name = self._param_name(qparam)
        if isinstance(levels, ops.PackedWidths):
            ops._check_scales(scales, name)
        else:
            ops.check_levels(levels, scales, bits.view(-1, 1), name=name)
        return quantized

    def _apply_restore(self, qparam, prepared) -> None:
        levels, scales, bits = prepared
        name = self._param_name(qparam)
        if isinstance(levels, ops.PackedWidths):
            levels.dequantize_into(scales, qparam.param.data, name=name)
        else:
            ops.dequantize_levels(levels, scales, bits.view(-1, 1), name=name, out=qparam.param.data)

    def _bits_offset(self) -> int:
        """min_bits as the integer subtracted from stored bits before packing."""
        if float(self.min_bits) != int(self.min_bits):
            raise QuantizerConfigError(f"packing needs an integer min_bits, got {self.min_bits}")
        return int(self.min_bits)

    def _quantized_state_of(self, qparam, packed: bool, pack_fn) -> tp.Any:
        if not (packed and pack_fn is bitpack.pack):
            return super()._quantized_state_of(qparam, packed, pack_fn)
        bits = self._stored_bits(qparam)
        # the levels go straight into their width's packed lines
        packs = ops.quantize_pack(qparam.param.data, bits, self._group_size_of(qparam.param),
                                  name=self._param_name(qparam))
        if packs is None:
            return super()._quantized_state_of(qparam, packed, pack_fn)
        outs, totals, mn, mx = packs
        top = self._packed_widths(totals[MAX_STORED_BITS] > 0)
        return (outs[1:top + 1], (mn, mx), self._pack_stored_bits(qparam, bits, pack_fn))

    def _quantized_states(self, packed: bool, pack_fn) -> tp.List[tp.Any]:
        owners = self._unique_qparams()
        if not (packed and pack_fn is bitpack.pack and self._multi_kernels_take(owners)):
            return super()._quantized_states(packed, pack_fn)
        # bits and ranges of every parameter in one call, then their levels
        # straight into each width's packed lines in another
        names = self._owner_names()
        ps = [qp.param for qp in owners]
        group_sizes = [self._group_size_of(qp.param) for qp in owners]
        _, bits, ranges, totals = ops.quantize_all(ps, [qp.logit for qp in owners], [self.group_size] * len(owners),
                                                   self._bits_param, self.extra_bits, names, values=False)
        offset = self._bits_offset()
        for qparam, total in zip(owners, totals):
            if any(total[:offset]):
                raise self._below_min_bits(qparam)
        outs, packed_bits = ops.quantize_pack_all(ps, bits, group_sizes, ranges, totals, offset)
        return [(out[1:self._packed_widths(total[MAX_STORED_BITS] > 0) + 1], (mn, mx), packed)
                for out, total, (mn, mx), packed in zip(outs, totals, ranges, packed_bits)]

    @staticmethod
    def _packed_widths(has_top_width: bool) -> int:
        """diffq's layout has one packed tensor per width 1..14. diffq drops
        groups of 15 bits; we add their entry only when there are some
        (`has_top_width`), so every other state stays byte-identical and
        diffq reads ours."""
        return MAX_STORED_BITS if has_top_width else MAX_STORED_BITS - 1

    def _below_min_bits(self, qparam) -> ValueError:
        return ValueError(f"parameter {self._param_name(qparam)!r} has groups below "
                          f"min_bits={self.min_bits}; cannot pack their bits")

    def _pack_stored_bits(self, qparam, bits: torch.Tensor, pack_fn):
        offset = self._bits_offset()
        below = self._below_min_bits(qparam)
        if pack_fn is bitpack.pack and ops.kernels_available() and bits.device.type == "cpu" \
                and bits.dtype == torch.uint8:
            try:
                return ops.pack_widths(bits, offset)
            except ValueError:
                raise below from None
        if bool((bits < offset).any()):
            raise below
        return pack_fn(bits - offset)

    def _bit_pack_param(self, qparam, quantized, pack_fn):
        levels, scales, bits = quantized
        top = self._packed_widths(bool((bits == MAX_STORED_BITS).any()))
        if pack_fn is bitpack.pack and ops.kernels_available() and levels.device.type == "cpu":
            # one pass splits the levels into per-width streams (no masked copies)
            group_size = levels.shape[-1] if levels.dim() == 2 else levels.numel()
            streams, totals = ops.split_by_width(levels, bits, group_size)
            all_packed = [ops.pack_bits(streams[sum(totals[:w]):sum(totals[:w + 1])], w)
                          if totals[w] else None for w in range(1, top + 1)]
        else:
            all_packed = []
            for width in range(1, top + 1):
                selected = levels[bits == width]
                all_packed.append(pack_fn(selected, width) if selected.numel() else None)
        return (all_packed, scales, self._pack_stored_bits(qparam, bits, pack_fn))

    def _bit_unpack_param(self, qparam, packed, unpack_fn):
        if not isinstance(packed, (tuple, list)) or len(packed) != 3:
            raise ValueError("expected (packed levels, scales, packed bits), got "
                             f"{type(packed).__name__}")
        all_packed, scales, packed_bits = packed
        if not isinstance(all_packed, (tuple, list)):
            raise TypeError(f"packed levels must be a list, got {type(all_packed).__name__}")
        groups = qparam.logit.numel()
        group_size = self._group_size_of(qparam.param)
        if len(all_packed) > MAX_STORED_BITS:
            raise ValueError(f"{len(all_packed)} packed level tensors, at most {MAX_STORED_BITS}")
        if unpack_fn is unpack_state and ops.kernels_available():
            widths, counts = ops.widths_from_stored(unpack_fn(packed_bits, groups), self._bits_offset())
            levels = self._unpack_levels_by_width(all_packed, widths, counts, group_size)
            return (levels, scales, widths)
        bits = unpack_fn(packed_bits, groups).to(torch.int16) + self._bits_offset()
        if bits.numel() != groups:
            raise ValueError(f"packed bits hold {bits.numel()} groups, expected {groups}")
        if bool((bits < 1).any()) or bool((bits > MAX_STORED_BITS).any()):
            raise ValueError(f"bits outside 1..{MAX_STORED_BITS} in the packed state")
        # the general path (torch_pack layout, no kernels): masks per width
        levels = torch.zeros(groups, group_size, dtype=torch.int16)
        filled = torch.zeros(groups, dtype=torch.bool)
        for index, packed_levels in enumerate(all_packed):
            width = index + 1
            if packed_levels is None:
                continue
            planes = packed_planes(packed_levels)
            if planes is not None and planes != width:
                raise ValueError(f"packed levels of {width}-bit groups have {planes} bit planes")
            mask = bits == width
            count = int(mask.sum())
            levels[mask] = unpack_fn(packed_levels, count * group_size).view(count, group_size) \
                .to(torch.int16)
            filled |= mask
        if not bool(filled.all()):
            _missing_widths(sorted(set(bits[~filled].tolist())))
        return (levels, scales, bits.to(torch.uint8))

    @staticmethod
    def _unpack_levels_by_width(all_packed, bits: torch.Tensor, counts, group_size: int):
        """The levels of diffq's per-width packed tensors, left packed
        (ops.PackedWidths) once each needed one is checked: present, of the
        right width and exactly the size its groups take. Every group has one
        width, so every row is filled, or an error is raised."""
        packs = [None] * 16
        missing = []
        for width in range(1, 16):
            values = counts[width] * group_size
            if not values:
                continue
            packed = all_packed[width - 1] if width <= len(all_packed) else None
            if packed is None:
                missing.append(width)
                continue
            planes = packed_planes(packed)
            if planes is not None and planes != width:
                raise ValueError(f"packed levels of {width}-bit groups have {planes} bit planes")
            check_packed_state(packed, values)
            packs[width] = packed
        if missing:
            _missing_widths(missing)
        return ops.PackedWidths(packs, bits.view(-1), counts, group_size)

    def detach(self):
        super().detach()
        self._eval_cache.clear()
        for qparam in self._qparams:
            if hasattr(qparam.module, qparam.name + self.suffix):
                delattr(qparam.module, qparam.name + self.suffix)

    def __repr__(self):
        return simple_repr(self)


class _TrainPlan(tp.NamedTuple):
    """See DiffQuantizer._train_plan."""
    key: tp.Any
    kernel_qps: tp.List[tp.Any]
    torch_qps: tp.List[tp.Any]
    ps: tp.List[torch.Tensor]
    logits: tp.List[torch.Tensor]
    names: tp.List[str]
    group_sizes: tp.List[int]
    allocs: tp.List[ops.Alloc]
    size_weights: tp.Optional[tp.Sequence[float]]  # with every parameter on the kernels
    sites: tp.List[tp.Tuple[tp.Any, int]]  # each quantized parameter's place, its value's index
    dense: bool  # every ps and logits contiguous when the plan was made
    layouts: ops.TrainLayouts

    @classmethod
    def make(cls, quantizer: "DiffQuantizer", key) -> "_TrainPlan":
        owners = quantizer._unique_qparams()
        on_kernels = [ops.on_kernel_path(qp.param, qp.logit) for qp in owners]
        kernel_qps = [qp for qp, k in zip(owners, on_kernels) if k]
        torch_qps = [qp for qp, k in zip(owners, on_kernels) if not k]
        order = {id(qp): i for i, qp in enumerate(kernel_qps + torch_qps)}
        sites = [(qp, order[id(qp if qp.other is None else qp.other)]) for qp in quantizer._qparams]
        ps, logits = [qp.param for qp in kernel_qps], [qp.logit for qp in kernel_qps]
        allocs = [a for a, k in zip(quantizer._allocs()[0], on_kernels) if k]
        return cls(key, kernel_qps, torch_qps, ps, logits,
                   [n for n, k in zip(quantizer._owner_names(), on_kernels) if k],
                   [quantizer.group_size] * len(kernel_qps), allocs,
                   None if torch_qps else quantizer._size_terms()[0], sites,
                   all(t.is_contiguous() for t in ps + logits),
                   ops.TrainLayouts.make(ps, logits, allocs, reuse=quantizer._scratch.enabled))

    def noisy_weights(self, quantizer: "DiffQuantizer", link: ops.SizeLink,
                      seed: tp.Optional[int] = None) -> tp.List[torch.Tensor]:
        """The kernel parameters' noisy weights; with every parameter here,
        model_size() can add its gradient in their backward (ops.SizeLink).
        While they were all contiguous, the first try (no `seed`) hands the
        buffers to the binding as they are, and ops.KernelRefused says it
        would not take them; a retry with the refused call's seed makes
        contiguous copies where needed."""
        whole = self.size_weights is not None
        return ops.noisy_weights(self.ps, self.logits, self.group_sizes, ops.NOISE_KINDS[quantizer.noise],
                                 quantizer._bits_param, self.names, quantizer._generator, self.allocs,
                                 link=link if whole else None, size_weights=self.size_weights,
                                 as_they_are=self.dense and seed is None, seed=seed,
                                 layouts=self.layouts if seed is None else None)
