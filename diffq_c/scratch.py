"""Memory kept between calls for the large float32 tensors a quantizer makes
on every call: noisy weights, the logits' gradients, and in eval the
quantized weights and the sigmoid of the logits.

Why: a fresh tensor per parameter and per call is memory that the first
write faults in page by page, and that the C library may hand back to the
system when it is freed, to fault it in again next time. On the machine the
benchmarks ran on, that cost more than the kernels filling the tensors
(benchmarks/RESULTS.md). Memory lent again is already faulted in.

What is kept, per owner (a parameter) and size, at most `per_size`:
- tensors of 32 MiB and more. glibc maps those afresh on every allocation
  and unmaps them when freed, so keeping them takes nothing from anyone;
- in eval on the per-parameter paths (UniformQuantizer, and DiffQuantizer
  where the multi-tensor kernels do not apply), smaller ones too
  (`small_too`): each eval forward quantizes and
  restores every weight, and the fresh tensors of one batch are handed back
  to the system before the next. They are let go when training resumes
  (`release_small`), where malloc recycles such memory among the step's
  temporaries and keeping it would raise the step's peak.
Tensors of one size take turns: at group_size=1 the layer's backward
releases the noisy weight before the logits' gradient is made, which then
takes the same memory, as it would through malloc.

Safety: memory is lent again only when nothing but this pool holds it (its
use count says so): a tensor the caller, autograd (a graph kept with
retain_graph) or a view still holds is never written over. A call that
finds all of its kind busy gets fresh memory.
"""
import typing as tp

import torch

# The use count of a storage; private in torch (its CUDA graph trees use it).
# Without it, every call gets fresh memory, as diffq does.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def reuse_supported() -> bool:
    return _use_count is not None


# glibc's largest mmap threshold on 64-bit systems: bigger allocations are
# always mapped afresh and unmapped when freed
KEEP_BYTES = 32 << 20


def _free(storage: torch.UntypedStorage) -> bool:
    # 1: only the pool's own storage object refers to it
    return _use_count(storage._cdata) == 1


class Scratch:
    """Float32 CPU storages per (owner, size), lent out as tensors."""

    def __init__(self, per_size: int = 2, keep_bytes: int = KEEP_BYTES) -> None:
        self._storages: tp.Dict[tp.Tuple[tp.Hashable, int], tp.List[torch.UntypedStorage]] = {}
        self.per_size = per_size
        self.keep_bytes = keep_bytes
        self.enabled = True

    def __deepcopy__(self, memo) -> "Scratch":
        # a copy of a quantizer starts with nothing kept, not a copy of it
        other = Scratch(self.per_size, self.keep_bytes)
        other.enabled = self.enabled
        return other

    def __getstate__(self):
        return {"per_size": self.per_size, "keep_bytes": self.keep_bytes, "enabled": self.enabled}

    def __setstate__(self, state) -> None:
        self.__init__(state["per_size"], state["keep_bytes"])
        self.enabled = state["enabled"]

    def empty(self, owner: tp.Hashable, shape: tp.Sequence[int],
              small_too: bool = False) -> torch.Tensor:
        """An uninitialized float32 CPU tensor of `shape`, over kept memory
        of `owner`'s that nobody else holds, else over fresh memory, kept
        for later calls when it is large (or `small_too`) and the owner has
        fewer than `per_size` of that size."""
        shape = tuple(int(s) for s in shape)
        if not (self.enabled and reuse_supported()):
            return torch.empty(shape, dtype=torch.float32)
        numel = 1
        for size in shape:
            numel *= size
        key = (owner, numel)
        kept = self._storages.get(key, [])
        storage = next((s for s in kept if _free(s)), None)
        if storage is None:
            storage = torch.empty(numel, dtype=torch.float32).untyped_storage()
            if (small_too or numel * 4 >= self.keep_bytes) and len(kept) < self.per_size:
                self._storages[key] = kept + [storage]
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)

    def lender(self, owner: tp.Hashable,
               small_too: bool = False) -> tp.Callable[[tp.Sequence[int]], torch.Tensor]:
        """`empty` for one owner, for the functions that take an allocator."""
        return lambda shape: self.empty(owner, shape, small_too)

    def release_small(self) -> None:
        """Let go of what is kept under keep_bytes (see the module's text)."""
        for key in [k for k, kept in self._storages.items() if kept and kept[0].nbytes() < self.keep_bytes]:
            del self._storages[key]

    def nbytes(self) -> int:
        """Bytes kept (those lent out at the moment included)."""
        return sum(s.nbytes() for kept in self._storages.values() for s in kept)

    def clear(self) -> None:
        """Drop every storage; tensors lent out keep theirs alive."""
        self._storages.clear()
