"""Quantized weights kept across eval forwards.

A validation loop runs many eval forwards with the same weights and bits;
diffq quantizes every weight on each of them. A quantizer keeps the
quantized values of its last eval forward and the state they came from,
and hands them out again while that state holds:

- each weight's and each logit's version counter, data pointer, shape,
  strides, dtype and device: any in-place change made through the tensor
  (an optimizer's update, `load_state_dict`, `torch.no_grad()` edits,
  `copy_`) bumps the counter, and assigning `.data` changes the pointer or,
  for a view of the same memory (`p.data = p.data.t()`), the layout. The
  values kept have their weight's layout, and were made by the C kernels
  for float32 CPU tensors, which the key then vouches for;
- a count of optimizer steps taken in this process: torch's fused
  optimizers update parameters without bumping their counters;
- the quantizer's settings (group size, bits range, extra bits).

Edits through a tensor's `.data` bypass its version counter (torch's own
rule: autograd does not see them either); after such an edit call
`quantizer.clear_eval_cache()`, or set `quantizer.cache_eval = False`.

Version counters are read through `Tensor._version`, which torch does not
document as public: caching is a speed path. Without it (or with
cache_eval False) every eval forward quantizes, as diffq does, with the
same results.
"""
import importlib
import typing as tp

import torch

_optimizer_steps = 0


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far, or -1 when they cannot
    be counted (torch without step hooks)."""
    return _optimizer_steps if _STEPS_WATCHED else -1


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizers() -> bool:
    try:
        module = importlib.import_module("torch.optim.optimizer")
    except ImportError:
        return False
    register = getattr(module, "register_optimizer_step_post_hook", None)
    if register is None:
        return False
    register(_count_step)
    return True


# without the hook, fused optimizer steps could go unseen: no caching then
_STEPS_WATCHED = _watch_optimizers()


class EvalCache:
    """The values of one quantizer's last eval quantization and its key."""

    def __init__(self) -> None:
        self.enabled = True
        self.clear()

    def clear(self) -> None:
        self._key: tp.Any = None
        self._values: tp.Optional[tp.List[torch.Tensor]] = None

    def __getstate__(self):
        return {"enabled": self.enabled}

    def __setstate__(self, state) -> None:
        self.__init__()
        self.enabled = state["enabled"]

    def __deepcopy__(self, memo) -> "EvalCache":
        other = EvalCache()
        other.enabled = self.enabled
        return other

    def key(self, quantizer, tensors: tp.Sequence[torch.Tensor]) -> tp.Any:
        """What the quantized values depend on (`tensors`: the weights and
        the logits), or None when it cannot be told (caching off, tensors
        without version counters)."""
        steps = optimizer_steps()
        if not self.enabled or steps < 0:
            return None
        try:
            state = tuple([(t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_cpu) for t in tensors])
        except (AttributeError, RuntimeError):  # inference-mode tensors have no counter
            return None
        return (steps, quantizer.group_size, quantizer.min_bits, quantizer.max_bits,
                quantizer.extra_bits, state)

    @staticmethod
    def all_cpu_float32(key) -> bool:
        """Whether every tensor of a (not None) key is a float32 CPU one."""
        return all(dtype is torch.float32 and cpu for *_, dtype, cpu in key[-1])

    def get(self, key) -> tp.Optional[tp.List[torch.Tensor]]:
        if key is None or key != self._key:
            return None
        return self._values

    def put(self, key, values: tp.List[torch.Tensor]) -> None:
        if key is None:
            self.clear()
        else:
            self._key, self._values = key, values
