"""Tensor-level operations: allocate outputs, pick the C kernels or the pure
torch path, and define autograd for the noisy weights and the size penalty.

The C kernels take CPU float32 buffers. Everything else (CUDA tensors,
float16/float64 parameters, an extension that failed to load) runs the same
math in plain torch, so nothing fails where diffq works.
"""
import functools
import math
import sys
import typing as tp
import warnings

import torch

from . import eval_cache as _eval_cache

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    warnings.warn(f"diffq_c: C kernels unavailable ({exc}); using the pure torch path.")

NOISE_KINDS = {"uniform": 0, "gaussian": 1}
PARAM_MODES = {"bits": 0, "noise": 1}


# the binding refuses more (OpenMP would try to start them all)
MAX_THREADS = 1024


def num_threads() -> int:
    """Threads for the kernels: torch's own setting, so we never oversubscribe it."""
    return min(MAX_THREADS, max(1, torch.get_num_threads()))


def kernels_available() -> bool:
    return _C is not None


def on_kernel_path(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can serve these tensors (CPU, float32)."""
    return _C is not None and all(t.is_cpu and t.dtype is torch.float32 for t in tensors)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous detached 1-D view, copying only when the layout needs it
    (channels_last or transposed weights)."""
    return t.detach().contiguous().view(-1)


class BitsParam(tp.NamedTuple):
    """How logits map to bits, as the kernels take it."""
    mode: int
    min_bits: float
    max_bits: float
    log_min_noise: float
    log_max_noise: float

    @classmethod
    def make(cls, param: str, min_bits: float, max_bits: float) -> "BitsParam":
        min_noise = 1 / (2 ** max_bits - 1)
        max_noise = 1 / (2 ** min_bits - 1)
        return cls(PARAM_MODES[param], float(min_bits), float(max_bits),
                   math.log(min_noise), math.log(max_noise))


def bits_from_logit(logit: torch.Tensor, prm: BitsParam) -> torch.Tensor:
    """Differentiable bits from logits, in torch (the reference formula)."""
    t = torch.sigmoid(logit)
    if prm.mode == PARAM_MODES["noise"]:
        noise_scale = torch.exp(t * prm.log_min_noise + (1 - t) * prm.log_max_noise)
        return torch.log2(1 + 1 / noise_scale)
    return prm.max_bits * t + (1 - t) * prm.min_bits


# --------------------------------------------------------------- noise


_MASK64 = 0xFFFFFFFFFFFFFFFF


def draw_seed_tensor(generator: tp.Optional[torch.Generator] = None) -> torch.Tensor:
    """A 63-bit seed from torch's generator as an int64 scalar tensor (so a
    compiled forward draws it inside its graph)."""
    return torch.randint(0, 2 ** 63 - 1, (), generator=generator)


def draw_seed(generator: tp.Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from torch's generator, so torch.manual_seed replays a run."""
    return int(draw_seed_tensor(generator).item())


def _empty_f32(shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


Alloc = tp.Callable[[tp.Sequence[int]], torch.Tensor]


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when contiguous (the binding reads it as it is), else a
    contiguous copy in its logical order (channels_last, transposed), or
    the dense tensor of a sparse one (nn.Embedding(sparse=True)'s
    gradient, which diffq cannot take at all)."""
    if t.layout != torch.strided:
        return t.detach().to_dense()
    return t if t.is_contiguous() else t.detach().contiguous()


def _dense_on_refusal(call, *lists):
    """call(*lists) with the tensors as they are, the common case; when the
    binding refuses one (non-contiguous: it checks every buffer before it
    writes anything), again with contiguous copies, where a genuine error
    is raised again."""
    try:
        return call(*lists)
    except (TypeError, ValueError):
        return call(*[[_dense(t) for t in tensors] for tensors in lists])


def _has_memory(t: torch.Tensor) -> bool:
    """Whether t has memory of its own a kernel could read: not one of
    torch.func's wrapped tensors, nor vmap's batched ones."""
    try:
        t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def transforms_active() -> bool:
    """Whether torch.func's transforms (grad, jacrev, vjp, ...) are at work:
    fresh tensors then come out wrapped, with no memory a kernel could read
    or write, and autograd.Functions need functorch's own protocol. Asked
    only after a kernel path failed, so it costs nothing otherwise."""
    return not _has_memory(torch.empty(0))


def compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing: then the quantizer calls
    the registered operators, which it can see, instead of the kernels."""
    return _is_compiling()


def _find_is_compiling():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    return lambda: False


_is_compiling = _find_is_compiling()


def _torch_release() -> tp.Tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


TORCH_RELEASE = _torch_release()


def compile_follows_hooks() -> bool:
    """Whether torch.compile traces the weights the quantizer's hooks put in
    the modules. It does where dynamo traces torch's own modules inline, their
    parameters read where the forward reads them: the default from torch 2.5
    (`torch._dynamo.config.inline_inbuilt_nn_modules`). torch 2.4 calls the
    submodules as opaque modules whose parameters it took when it traced, so
    a compiled forward silently ran on the float weights there (measured on
    2.4.1, with that setting on as well)."""
    if TORCH_RELEASE < (2, 5):
        return False
    if TORCH_RELEASE >= (2, 13):
        # the setting is always on there, and reading it warns (deprecated)
        return True
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    return bool(getattr(config, "inline_inbuilt_nn_modules", True))


def _refuse_traced_forward() -> None:
    raise RuntimeError(
        "torch.compile of a model quantized by diffq_c needs torch >= 2.5 with "
        "torch._dynamo.config.inline_inbuilt_nn_modules on (its default there); "
        f"this is torch {torch.__version__}. Its compiler would run the forward on the float "
        "weights, without the noise or the quantization the quantizer puts in the modules. "
        "Run the model eagerly, or upgrade torch.")


def _outside_traces(fn):
    """fn run outside any trace (a graph break), so that an error it raises
    reaches the caller (raised inside a trace, dynamo runs the frame again
    eagerly, where nothing is compiling, and the error is lost). Only on
    torch < 2.13: torch.compiler.disable imports dynamo (about 1 s of import
    time), and from 2.13 compile_follows_hooks() is always true, so the
    refusal is never reached there."""
    if TORCH_RELEASE >= (2, 13):
        return fn
    return getattr(getattr(torch, "compiler", None), "disable", lambda f: f)(fn)


refuse_traced_forward = _outside_traces(_refuse_traced_forward)

RANGE_FIELDS = 7  # min, max, ties at min, ties at max, non-finite, first min, first max


def _raise_nonfinite(ranges: torch.Tensor, names) -> None:
    bad = ranges[:, 4]
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"parameter {names[index]!r} holds {int(bad[index])} non-finite values "
                         "(NaN or inf); cannot add quantization noise")


class KernelRefused(Exception):
    """The binding would not take buffers handed to it as they are (a
    device, dtype or layout it does not take): nothing was written. `seed`
    is the one drawn for the call, for the retry to use."""

    def __init__(self, message: str, seed: int) -> None:
        super().__init__(message)
        self.seed = seed


def noise_forward_all(ps: tp.Sequence[torch.Tensor], logits: tp.Sequence[torch.Tensor], seed: int,
                      group_sizes: tp.Sequence[int], kind: int, prm: "BitsParam",
                      names: tp.Sequence[str], allocs: tp.Optional[tp.Sequence[Alloc]] = None,
                      as_they_are: bool = False, layout: tp.Optional["SharedLayout"] = None,
                      size_stats: tp.Optional[torch.Tensor] = None):
    """noisy_i = p_i + (max(p_i) - min(p_i)) * step(bits(logit_i)) * noise(seed_i)
    for every parameter in one kernel call (seed_i derived from `seed` and
    i). No autograd here: returns the noisy tensors and the ranges the
    backward needs (float64 [parameters, RANGE_FIELDS]). `allocs[i](shape)`
    gives output i, or `layout` (of the ps' shapes) gives them all. With
    `as_they_are`, ps and logits go to the binding
    without a contiguous copy where they lack one (a caller that knows them
    to be dense saves the look), and KernelRefused says they were not.
    `size_stats` (float64 [parameters, 2]) receives what size_bits_all
    would give for the logits."""
    if layout is not None:
        noisy = layout.allocate()
    else:
        noisy = [(allocs[i] if allocs else _empty_f32)(p.shape) for i, p in enumerate(ps)]
    ranges = torch.empty((len(ps), RANGE_FIELDS), dtype=torch.float64)
    rest = (noisy, list(group_sizes), kind, seed & _MASK64, tuple(prm), ranges, num_threads(), size_stats)
    if as_they_are:
        try:
            nonfinite = _C.noise_forward_multi(ps, logits, *rest)
        except (TypeError, ValueError) as exc:
            raise KernelRefused(str(exc), seed) from exc
    else:
        nonfinite = _C.noise_forward_multi([_dense(p) for p in ps], [_dense(l) for l in logits], *rest)
    if nonfinite:
        _raise_nonfinite(ranges, names)
    return noisy, ranges


def noise_backward_one(grad: torch.Tensor, p: torch.Tensor, logit: torch.Tensor, seed: int, index: int,
                       group_size: int, kind: int, prm: "BitsParam", rng):
    """Gradients of parameter `index` of a noise forward seeded with `seed`:
    (grad_p, grad_logit), the noise regenerated."""
    grad_logit = _empty_f32(logit.shape)
    grad_p = torch.empty(p.shape, dtype=torch.float32)
    _C.noise_backward(_dense(grad), _dense(p), _dense(logit), grad_p, grad_logit, group_size, kind,
                      _C.derive_seed(seed & _MASK64, index), tuple(prm), tuple(rng), num_threads())
    return grad_p, grad_logit


# Parameters whose noisy weights share one autograd node: consecutive ones
# (in the model's order, which is the reverse of backward's, as
# DistributedDataParallel also assumes) totalling at most this many bytes;
# a larger parameter has a node of its own. The node's backward runs when
# backward has left every layer of its group, so gradients arrive group by
# group: for DDP, whose first bucket is 1 MiB and the others 25 MiB, as
# early as parameter by parameter. Tiny layers then cost one node and one
# kernel call between them instead of one each.
GRAD_GROUP_BYTES = 1 << 20

# vectors below this many values share one allocation (_vectors); larger
# ones get their own, which malloc recycles from step to step, where one
# large shared buffer would be mapped afresh and fault in every page
SHARED_VECTOR_MAX = 1 << 14


# from this many values on, finding out whether the incoming gradient can be
# updated in place (~5 us) costs less than a fresh gradient for p
IN_PLACE_MIN = 1 << 12


def _vectors(numels: tp.Sequence[int], allocs: tp.Optional[tp.Sequence[Alloc]] = None) -> tp.List[torch.Tensor]:
    """Uninitialized float32 vectors of these sizes: the small ones views of
    one buffer (one allocation instead of one a parameter, ~2 us each), the
    others from allocs[i] (kept memory for the large ones) or torch.empty."""
    shared = [n < SHARED_VECTOR_MAX for n in numels]
    small = [n for n, k in zip(numels, shared) if k]
    views = iter(torch.empty(sum(small), dtype=torch.float32).split(small) if small else ())
    return [next(views) if k else (allocs[i] if allocs else _empty_f32)((n,))
            for i, (n, k) in enumerate(zip(numels, shared))]


# SharedLayout(reuse=True) hands out the views of its last allocation
# again when nothing but the layout holds them or their memory: a view
# costs ~0.8 us to make, the look ~0.15. A speed path (private counts:
# Tensor._use_count, torch._C._storage_Use_Count): off, or without the
# counts, every allocation is fresh; tests hold the two to the same bits.
REUSE_VIEWS = True


def _hold_counts(views: tp.Sequence[torch.Tensor]) -> tp.Optional[tuple]:
    """What holds `views` (views of one buffer, in a list the caller keeps):
    their buffer's storage holders and each one's Python references and
    C++ uses, counted the same way each call; None without the counts."""
    try:
        return _storage_holders(views[0]), [(sys.getrefcount(v), v._use_count()) for v in views]
    except Exception:  # noqa: BLE001 - no counts: never reuse
        return None


class SharedLayout:
    """Uninitialized float32 tensors of fixed shapes, laid out once (see
    _make_layout): the small ones (under SHARED_VECTOR_MAX values, allocated by
    torch.empty) views of one buffer, made a block of equal shapes at a
    time (here a tensor of its own costs ~1.8 us, a view out of a block
    ~0.6), the others from allocs[i] (kept memory for the large ones) or
    torch.empty.

    With `reuse` (the noisy weights of a training forward), the views of
    the shared buffer are kept and handed out again by the next allocate()
    under the same grad mode when nothing else holds them or their memory:
    no Python reference (a hook that kept a noisy weight), no C++ one (a
    graph not yet run backward saved it), no other view of the buffer (a
    graph that saved a transpose of one). Then the counts are those
    measured when they were made; any other count, a fresh allocation. The
    grad modes keep apart so that a forward under no_grad never hands out
    a tensor that carries an earlier training forward's autograd history."""

    def __init__(self, shapes: tp.Sequence[tp.Sequence[int]],
                 allocs: tp.Optional[tp.Sequence[Alloc]] = None, reuse: bool = False) -> None:
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        self.allocs = allocs
        self.reuse = reuse
        # per grad mode: (the shared views in tensor order, None for the
        # others; those views alone; their counts then)
        self._kept: tp.Dict[bool, tp.Tuple[list, list, tuple]] = {}
        # a tensor with an allocator of its own (kept memory) keeps it
        shareable = None if allocs is None else tuple(a is _empty_f32 for a in allocs)
        self.layout = _make_layout(self.shapes, SHARED_VECTOR_MAX, shareable)
        # vectors all in the shared buffer (the logits' gradients of small
        # parameters): one split makes them in their order, ~0.55 us each
        # against ~0.75 for blocks, their reordering and their Python list
        self.sizes = ([s[0] for s in self.shapes]
                      if not self.layout.own and all(len(s) == 1 for s in self.shapes) else None)

    def allocate(self) -> tp.List[torch.Tensor]:
        if not (self.reuse and REUSE_VIEWS and self.layout.total):
            return self._fresh()
        mode = torch.is_grad_enabled()
        kept = self._kept.get(mode)
        if kept is not None and _hold_counts(kept[1]) == kept[2]:
            tensors = list(kept[0])
            _own_tensors(self.layout, self.shapes, torch.float32, self.allocs, tensors)
            return tensors
        tensors = self._fresh()
        own = [tensors[i] for i in self.layout.own]
        slots = [t if j >= 0 else None for t, j in zip(tensors, self.layout.where)]
        views = [t for t in slots if t is not None]
        del tensors  # counted as the next call will count them: held by the layout alone
        counts = _hold_counts(views)
        if counts is None:
            self._kept.pop(mode, None)
        else:
            self._kept[mode] = (slots, views, counts)
        tensors = list(slots)
        for i, t in zip(self.layout.own, own):
            tensors[i] = t
        return tensors

    def __getstate__(self):
        # a copy starts with nothing kept (what is kept carries autograd
        # history, which neither deepcopy nor pickle takes)
        return dict(self.__dict__, _kept={})

    def _fresh(self) -> tp.List[torch.Tensor]:
        if self.sizes is not None:
            return list(torch.empty(self.layout.total, dtype=torch.float32).split_with_sizes(self.sizes))
        return _views_of(self.layout, self.shapes, torch.float32, self.allocs)[0]


class _Layout(tp.NamedTuple):
    """Where _views_of puts tensors of given shapes (see _make_layout)."""
    total: int                                     # values of the shared buffer
    blocks: tp.List[tp.Tuple[int, tuple, int]]     # (count, shape, values) of each block
    where: tp.List[int]                            # per tensor: its index among the blocks' views, or -1
    index: tp.List[int]                            # per tensor: 0 (the shared buffer) or 1 + its rank among its own
    offset: tp.List[int]                           # per tensor: its first element in that buffer
    own: tp.List[int]                              # the tensors of their own


def _make_layout(shapes: tp.Tuple[tp.Tuple[int, ...], ...], small_max: int,
                 shareable: tp.Optional[tp.Tuple[bool, ...]] = None) -> _Layout:
    """Tensors under small_max values (and shareable[i], when given) grouped
    by shape, each group one block of a shared buffer ([count, *shape],
    unbound into its tensors); the others each a buffer of its own."""
    blocks: tp.Dict[tp.Tuple[int, ...], tp.List[int]] = {}
    for i, shape in enumerate(shapes):
        if math.prod(shape) < small_max and (shareable is None or shareable[i]):
            key = tuple(shape)
            # not setdefault: torch 2.4's compile cannot trace it
            if key not in blocks:
                blocks[key] = []
            blocks[key].append(i)
    n = len(shapes)
    where, index, offset = [-1] * n, [0] * n, [0] * n
    place = at = 0
    for shape, members in blocks.items():
        for i in members:
            where[i], offset[i] = place, at
            place, at = place + 1, at + math.prod(shape)
    own = [i for i in range(n) if where[i] < 0]
    for rank, i in enumerate(own):
        index[i] = 1 + rank
    return _Layout(at, [(len(m), shape, len(m) * math.prod(shape)) for shape, m in blocks.items()],
                   where, index, offset, own)


# the eval path lays out its values on every call: cached by shapes. A
# SharedLayout keeps its own (and may be made under torch.compile, which
# traces through a cache wrapper with a warning).
_layout = functools.lru_cache(maxsize=64)(_make_layout)


def _views_of(layout: _Layout, shapes: tp.Sequence[tp.Sequence[int]], dtype: torch.dtype,
              allocs: tp.Optional[tp.Sequence[Alloc]] = None):
    """The tensors `layout` places (uninitialized, contiguous: a view made
    one by one costs about as much as a tensor of its own, so a block of
    equal shapes is made at a time) and the buffers holding them, the
    shared one first; the others from allocs[i] (float32 only) or
    torch.empty."""
    shared = torch.empty(layout.total, dtype=dtype)
    views: tp.List[torch.Tensor] = []
    if layout.blocks:  # blocks of empty tensors too, with a total of 0
        for part, (count, shape, _) in zip(shared.split([n for _, _, n in layout.blocks]), layout.blocks):
            views.extend(part.view((count,) + shape).unbind(0))
    tensors = [views[j] if j >= 0 else None for j in layout.where]
    _own_tensors(layout, shapes, dtype, allocs, tensors)
    return tensors, [shared] + [tensors[i] for i in layout.own]


def _own_tensors(layout: _Layout, shapes, dtype: torch.dtype, allocs, tensors: tp.List) -> None:
    """The tensors of their own of `layout` into `tensors`, from allocs[i]
    (float32 only) or torch.empty."""
    for i in layout.own:
        tensors[i] = allocs[i](shapes[i]) if allocs else torch.empty(shapes[i], dtype=dtype)


def grad_groups(numels: tp.Sequence[int], cap_bytes: int = GRAD_GROUP_BYTES) -> tp.List[tp.Tuple[int, int]]:
    """[start, end) ranges of consecutive parameters, each totalling at most
    cap_bytes of float32 values or holding a single parameter."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if i > start and total + 4 * n > cap_bytes:
            groups.append((start, i))
            start, total = i, 0
        total += 4 * n
    if numels:
        groups.append((start, len(numels)))
    return groups


# The size penalty's gradient joins the noise's in _NoisyGroup's backward
# when model_size() follows a training forward (see SizeLink): each logit
# tensor then gets one gradient from one node and one kernel call, where
# apart autograd adds two. A speed path: the group keeps its tensors without
# save_for_backward (so a later backward of the size alone can pass through
# it again) and reads their version counters (Tensor._version, not public
# torch) to refuse, as saved tensors do, a backward after an in-place change.
# Off, the two gradients are computed apart; tests run both.
FUSE_SIZE_GRAD = True


class GroupConfig(tp.NamedTuple):
    """What a _NoisyGroup's backward needs besides its tensors."""
    seed: int
    first: int  # index of the group's first parameter in the forward
    ranges: torch.Tensor
    group_sizes: tp.Sequence[int]
    kind: int
    prm: "BitsParam"
    allocs: tp.Optional[tp.Sequence[Alloc]]
    size_weights: tp.Optional[tp.Sequence[float]]  # not None: linked to the size penalty
    fast: tp.Optional["GroupFast"] = None


class GroupFast(tp.NamedTuple):
    """A group of small parameters (none whose gradient could be updated in
    place) worked out once: what its backward hands the binding when every
    parameter got a gradient, without a loop over them."""
    grads: SharedLayout  # fresh gradients of the ps
    logit_grads: SharedLayout
    indices: tp.List[int]  # each parameter's index in the forward

    @classmethod
    def make(cls, ps, logits, first: int, allocs) -> tp.Optional["GroupFast"]:
        if any(p.numel() >= IN_PLACE_MIN for p in ps):
            return None
        return cls(SharedLayout([p.shape for p in ps]), SharedLayout([l.shape for l in logits], allocs),
                   list(range(first, first + len(ps))))


def _modified_in_place(t: torch.Tensor, saved: int) -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: a quantized parameter or its bit logits of shape {list(t.shape)} is at version "
        f"{t._version}; expected version {saved} instead (the noisy weights of the forward were "
        "made from its earlier values)")


class _NoisyGroup(torch.autograd.Function):
    """The noisy weights of a group of parameters (see GRAD_GROUP_BYTES),
    computed beforehand with all the others by noise_forward_all: forward
    hands them over, backward computes the group's gradients in one kernel
    call. Only the seeds and ranges are kept: the noise is regenerated.

    Linked to the size penalty (config.size_weights), it has one more
    output, a handle that model_size() takes as input: the gradient reaching
    the handle is the one of sum_i size_weights[i] * sum(bits(logit_i)),
    which backward adds to the logits' in the same kernel call."""

    @staticmethod
    def forward(ctx, config, noisy, *tensors):
        ctx.config = config
        ctx.set_materialize_grads(False)  # an unused weight gets no gradient, as in diffq
        if config.size_weights is None:
            ctx.save_for_backward(*tensors)
            return tuple(noisy)
        ctx.tensors = tensors
        ctx.versions = [t._version for t in tensors]
        return (*noisy, torch.empty(()))

    @staticmethod
    def backward(ctx, *grads):
        config = ctx.config
        size_grad = None
        if config.size_weights is None:
            tensors = ctx.saved_tensors
        else:
            # the handle's gradient comes last, after the parameters' count
            tensors, size_grad = ctx.tensors, grads[-1]
        count = len(tensors) // 2
        ps, logits = tensors[:count], tensors[count:]
        if needs_torch_backward(grads):
            if config.size_weights is not None:
                _NoisyGroup._check_versions(ctx, tensors, range(count))
            return (None, None, *_noise_torch_grads(config, ps, logits, grads[:count], size_grad))
        fast = config.fast
        if fast is not None and all(grads[i] is not None for i in range(count)):
            if config.size_weights is not None and [t._version for t in tensors] != ctx.versions:
                _NoisyGroup._check_versions(ctx, tensors, range(count))
            grad_ps = fast.grads.allocate()
            grad_logits = fast.logit_grads.allocate()
            scales = None
            if size_grad is not None:
                g = float(size_grad)
                scales = [g * w for w in config.size_weights]
            rest = (grad_ps, grad_logits, config.group_sizes, config.kind, config.seed & _MASK64, fast.indices,
                    tuple(config.prm), config.ranges, num_threads(), scales)
            # the incoming gradients as they are too: a strided one (the
            # gradient of a sum is an expanded scalar) is refused before
            # anything is written, and the retry takes contiguous copies
            _dense_on_refusal(lambda grads, ps, logits: _C.noise_backward_multi(grads, ps, logits, *rest),
                              grads[:count], ps, logits)
            return (None, None, *grad_ps, *grad_logits)
        grad_ps: tp.List[tp.Optional[torch.Tensor]] = [None] * count
        grad_logits: tp.List[tp.Optional[torch.Tensor]] = [None] * count
        if size_grad is None:
            live = [i for i in range(count) if grads[i] is not None]
        else:
            live = list(range(count))
        if not live:
            return (None, None, *grad_ps, *grad_logits)
        if config.size_weights is not None:
            _NoisyGroup._check_versions(ctx, tensors, [i for i in live if grads[i] is not None], live)
        allocs = config.allocs
        dense, outs = [], []
        vectors = _vectors([logits[i].numel() for i in live], [allocs[i] for i in live] if allocs else None)
        # d(noisy)/dp is the identity but at the extrema: a large incoming
        # gradient that autograd alone holds is updated there in place
        in_place = []
        for i in live:
            grad = grads[i]  # a local, as _FREE_GRAD_REFS counts it
            in_place.append(grad is not None and grad.numel() >= IN_PLACE_MIN and _owned_by_autograd(grad))
        del grad
        fresh = iter(_vectors([ps[i].numel() for i, own in zip(live, in_place)
                               if not own and grads[i] is not None]))
        for i, vector, own in zip(live, vectors, in_place):
            grad = grads[i]
            grad_logits[i] = vector if logits[i].dim() == 1 else vector.view(logits[i].shape)
            if grad is None:  # the size penalty's term alone
                outs.append(None)
            elif own:
                grad_ps[i] = grad
                outs.append(None)
            else:
                grad = _dense(grad)
                grad_p = next(fresh)
                grad_ps[i] = grad_p if grad_p.dim() == ps[i].dim() else grad_p.view(ps[i].shape)
                outs.append(grad_ps[i])
            dense.append(grad)
        scales = None
        if size_grad is not None:
            g = float(size_grad)
            scales = [g * config.size_weights[i] for i in live]
        rest = (outs, [grad_logits[i] for i in live], [config.group_sizes[i] for i in live], config.kind,
                config.seed & _MASK64, [config.first + i for i in live], tuple(config.prm), config.ranges,
                num_threads(), scales)
        _dense_on_refusal(lambda ps, logits: _C.noise_backward_multi(dense, ps, logits, *rest),
                          [ps[i] for i in live], [logits[i] for i in live])
        return (None, None, *grad_ps, *grad_logits)

    @staticmethod
    def _check_versions(ctx, tensors, noise_indices, logit_indices=None) -> None:
        """Raise as saved tensors would when a tensor the gradients need
        changed in place since the forward: the parameters with a gradient
        of the noise, the logits of `logit_indices` (all by default)."""
        count, versions = len(tensors) // 2, ctx.versions
        for i in noise_indices:
            if tensors[i]._version != versions[i]:
                raise _modified_in_place(tensors[i], versions[i])
        for i in range(count) if logit_indices is None else logit_indices:
            if tensors[count + i]._version != versions[count + i]:
                raise _modified_in_place(tensors[count + i], versions[count + i])


def needs_torch_backward(grads: tp.Sequence[tp.Optional[torch.Tensor]]) -> bool:
    """Whether a backward must compute with torch operators rather than the
    kernels: under create_graph=True (grad mode is then on in backward),
    or when the incoming gradients have no memory of their own, as under
    torch.autograd.grad(..., is_grads_batched=True), where they are vmap's
    batched tensors. One gradient tells: vmap batches them all."""
    if torch.is_grad_enabled():
        return True
    first = next((g for g in grads if g is not None), None)
    # sparse ones have no data_ptr either: the kernel path takes their dense form
    return first is not None and first.layout == torch.strided and not _has_memory(first)


def torch_grads(build: tp.Callable[..., tp.Sequence[torch.Tensor]], grads: tp.Sequence[torch.Tensor],
                inputs: tp.Sequence[torch.Tensor]) -> tp.List[tp.Optional[torch.Tensor]]:
    """The vector-Jacobian products of build(*inputs) (a node's forward
    recomputed with torch operators, one output per gradient) with `grads`,
    None for an input that needs none: what a backward returns instead of
    the kernels' gradients where needs_torch_backward says so. Under
    create_graph=True they are built on the inputs themselves, with history,
    so that a second derivative through them is not silently lost (the
    kernels' gradients carry none); otherwise on detached copies. `grads`
    are taken as given: their own history (which may lead back through this
    very node) is the outer derivative's, not this one's."""
    create = torch.is_grad_enabled()
    out: tp.List[tp.Optional[torch.Tensor]] = [None] * len(inputs)
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not wanted:
        return out
    with torch.enable_grad():
        leaves = list(inputs) if create else [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        pairs = [(o, g) for o, g in zip(build(*leaves), grads) if o.requires_grad]
        if not pairs:
            return out
        got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                  create_graph=create, allow_unused=True)
    for i, g in zip(wanted, got):
        out[i] = g
    return out


def _noise_torch_grads(config: GroupConfig, ps, logits, grads, size_grad) -> tp.List:
    """_NoisyGroup's gradients (those of its parameters, then of their
    logits) through torch_grads: the noise regenerated by the kernel (a
    constant), the rest diffq's formula in torch operators."""
    count = len(ps)
    grad_ps: tp.List[tp.Optional[torch.Tensor]] = [None] * count
    grad_logits: tp.List[tp.Optional[torch.Tensor]] = [None] * count
    for i in range(count):
        grad, size = grads[i], config.group_sizes[i]
        noise, outer = None, []
        if grad is not None:
            noise = torch.empty(ps[i].numel(), dtype=torch.float32)
            _C.noise_fill(noise, config.kind, _C.derive_seed(config.seed & _MASK64, config.first + i), 0,
                          num_threads())
            grad = grad if grad.layout == torch.strided else grad.to_dense()
            outer.append(grad.reshape(-1, ps[i].numel() if size == 0 else size))
        if size_grad is not None:
            outer.append(size_grad * config.size_weights[i])

        def build(p, logit, noise=noise, size=size):
            outputs = []
            if noise is not None:
                rows = _group_rows(p, size)
                outputs.append(_plus_noise(rows, logit, config.prm, noise.view(rows.shape)))
            if size_grad is not None:
                outputs.append(bits_from_logit(logit, config.prm).sum())
            return outputs

        grad_ps[i], grad_logits[i] = torch_grads(build, outer, [ps[i], logits[i]])
    return grad_ps + grad_logits


def _c_apply(fn: type) -> tp.Optional[tp.Callable]:
    """fn's autograd entry point under torch.autograd.Function.apply's
    Python wrapper (torch._C._FunctionBase.apply, bound to fn), or None
    where this torch does not have it as a built-in."""
    try:
        entry = super(torch.autograd.Function, fn).apply
    except AttributeError:
        return None
    if type(entry).__name__ != "builtin_function_or_method":
        return None
    return entry


# Function.apply's Python wrapper looks at every argument for functorch's
# dead wrappers: ~0.25 us a tensor, 0.1 ms a step for a model of 200 small
# parameters (their logits are arguments too). Outside functorch's
# transforms it finds none (the quantizer hands over its own parameters),
# so the entry point under it does the same. A speed path (not public
# torch): with FAST_APPLY off, or inside a transform, the public apply
# runs; tests hold the two to the same bits. torch 2.14 moved the wrapper's
# work into that entry (Function.apply is _FunctionBase.apply there), so the
# two paths are one call there.
FAST_APPLY = True
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_NOISY_GROUP_APPLY = _c_apply(_NoisyGroup)


def _apply_noisy_group(config, noisy, ps, logits):
    if (FAST_APPLY and _NOISY_GROUP_APPLY is not None and _functorch_active is not None
            and not _functorch_active()):
        return _NOISY_GROUP_APPLY(config, noisy, *ps, *logits)
    return _NoisyGroup.apply(config, noisy, *ps, *logits)


def _noisy_groups(ps, logits, noisy, seed, ranges, group_sizes, kind, prm, allocs,
                  size_weights=None, layouts: tp.Optional["TrainLayouts"] = None
                  ) -> tp.Tuple[tp.List[torch.Tensor], tp.Optional[tp.List[torch.Tensor]]]:
    """noisy (from noise_forward_all) attached to autograd, group by group;
    with size_weights, also each group's handle (see _NoisyGroup)."""
    out: tp.List[torch.Tensor] = []
    handles: tp.Optional[tp.List[torch.Tensor]] = None if size_weights is None else []
    groups = grad_groups([p.numel() for p in ps]) if layouts is None else layouts.groups
    for g, (a, b) in enumerate(groups):
        config = GroupConfig(seed, a, ranges, group_sizes[a:b], kind, prm, allocs[a:b] if allocs else None,
                             None if size_weights is None else size_weights[a:b],
                             None if layouts is None else layouts.fast[g])
        results = _apply_noisy_group(config, noisy[a:b], ps[a:b], logits[a:b])
        if handles is None:
            out.extend(results)
        else:
            out.extend(results[:-1])
            handles.append(results[-1])
    return out, handles


class SizeLink:
    """The handles of the last training forward's noisy groups, through
    which model_size() routes its gradient (see _NoisyGroup), and what they
    hold for: the logits, their versions and data pointers at that forward
    (an in-place change or a `.data` assignment since is seen; an edit
    through `.data` in place is not, as for the eval cache: call
    model_size() after the next forward then). Not copied or pickled (a
    copy has no forward of its own yet)."""

    def __init__(self) -> None:
        # whether model_size() looked at the last training forward's nodes:
        # the next forward then gives the size's statistics from its steps
        # (see wants_stats). Survives clear(): it is about the next forward.
        self.read = True
        self.clear()

    def clear(self) -> None:
        self.handles: tp.Optional[tp.List[torch.Tensor]] = None
        self.logits: tp.Sequence[torch.Tensor] = ()
        self.versions: tp.List[int] = []
        self.weights: tp.Sequence[float] = ()
        self.stats: tp.Optional[torch.Tensor] = None
        self.steps = -1

    def set(self, handles, logits, weights, stats: tp.Optional[torch.Tensor] = None) -> None:
        """`stats`: the logits' size_bits_all at the forward, as a tensor."""
        self.handles, self.logits, self.weights, self.stats = handles, logits, weights, stats
        self.versions = [(l._version, l.data_ptr()) for l in logits]
        self.steps = _eval_cache.optimizer_steps()
        self.read = False

    def wants_stats(self) -> bool:
        """Whether the next training forward should give the logits' size
        statistics (size_bits_all, from the steps it computes anyway at
        group_size 1, a pass over the logits otherwise): when model_size()
        read the last forward's link, or no forward set one yet. A loop
        that never calls model_size() (or calls it without grad) then skips
        that work from its second step on; one that starts calling it gets
        the statistics again from the forward after its first call, which
        computes them itself."""
        return self.read

    def take(self, logits: tp.Sequence[torch.Tensor], weights: tp.Sequence[float]):
        """(handles, stats) when model_size() of these logits and weights may
        go through the handles: the same logits, unchanged since the
        forward, all requiring grad, with grad enabled; stats (else None)
        when no optimizer step can have changed them unseen since (fused
        optimizers leave version counters alone). None otherwise."""
        handles = self.handles
        if (handles is None or not FUSE_SIZE_GRAD or not torch.is_grad_enabled() or compiling()
                or len(logits) != len(self.logits) or tuple(weights) != tuple(self.weights)):
            return None
        for logit, mine, (version, address) in zip(logits, self.logits, self.versions):
            if (logit is not mine or not logit.requires_grad or logit._version != version
                    or logit.data_ptr() != address):
                return None
        self.read = True
        steps = _eval_cache.optimizer_steps()
        return handles, self.stats if steps >= 0 and steps == self.steps else None

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self.clear()

    def __deepcopy__(self, memo) -> "SizeLink":
        return SizeLink()


class _NoisyWeightOp(torch.autograd.Function):
    """One parameter's noisy weight under torch.compile: the gradients of
    _NoisyGroup, parameter by parameter, through the registered operators,
    with the seed and ranges as tensors (a compiled graph's backward is one
    node anyway: grouping would save nothing there)."""

    @staticmethod
    def forward(ctx, p, logit, noisy, seed, ranges, index, group_size, kind, prm):
        ctx.save_for_backward(p, logit, seed, ranges)
        ctx.config = (index, group_size, kind, prm)
        return noisy

    @staticmethod
    def backward(ctx, grad):
        p, logit, seed, ranges = ctx.saved_tensors
        index, group_size, kind, prm = ctx.config
        grad_p, grad_logit = torch.ops.diffq_c.noise_backward(
            grad.contiguous(), p, logit, seed, ranges, index, group_size, kind, [float(v) for v in prm])
        return grad_p, grad_logit, None, None, None, None, None, None, None


class TrainLayouts(tp.NamedTuple):
    """Allocation plans of a training forward over fixed parameters: the
    noisy weights, the gradient groups, and each group's GroupFast."""
    noisy: SharedLayout
    groups: tp.List[tp.Tuple[int, int]]
    fast: tp.List[tp.Optional[GroupFast]]

    @classmethod
    def make(cls, ps: tp.Sequence[torch.Tensor], logits: tp.Sequence[torch.Tensor],
             allocs: tp.Optional[tp.Sequence[Alloc]], reuse: bool = False) -> "TrainLayouts":
        """`reuse`: the noisy weights' small tensors handed out again from
        step to step (SharedLayout). Not the gradients: autograd takes a
        gradient over as the parameter's .grad only when nothing else
        holds it, and a layout that kept it would make it copy."""
        groups = grad_groups([p.numel() for p in ps])
        return cls(SharedLayout([p.shape for p in ps], allocs, reuse=reuse), groups,
                   [GroupFast.make(ps[a:b], logits[a:b], a, allocs[a:b] if allocs else None)
                    for a, b in groups])


def noisy_weights(ps: tp.Sequence[torch.Tensor], logits: tp.Sequence[torch.Tensor],
                  group_sizes: tp.Sequence[int], kind: int, prm: "BitsParam", names: tp.Sequence[str],
                  generator: tp.Optional[torch.Generator] = None,
                  allocs: tp.Optional[tp.Sequence[Alloc]] = None,
                  link: tp.Optional[SizeLink] = None,
                  size_weights: tp.Optional[tp.Sequence[float]] = None,
                  as_they_are: bool = False, seed: tp.Optional[int] = None,
                  layouts: tp.Optional[TrainLayouts] = None) -> tp.List[torch.Tensor]:
    """The noisy weight of every parameter (CPU float32 ones: see
    on_kernel_path), differentiable in p and logit, from one seed drawn
    from `generator` (torch's global one when None). With `link` and
    `size_weights` (the weights model_size() gives each logit tensor's
    bits), `link` (which the caller cleared) is set so that model_size()
    can route its gradient through this forward's nodes (see _NoisyGroup).
    `as_they_are`: see noise_forward_all (the torch.compile path ignores
    it). `seed`: the one to use instead of drawing one (a retry's).
    `layouts`: how to allocate, worked out beforehand for these ps (the
    binding refuses noisy weights not of the ps' shapes)."""
    if compiling():
        seed = draw_seed_tensor(generator)
        prm_list = [float(v) for v in prm]
        with torch.no_grad():
            noisy, ranges = torch.ops.diffq_c.noise_forward(list(ps), list(logits), seed,
                                                            list(group_sizes), kind, prm_list, list(names))
        return [_NoisyWeightOp.apply(p, l, x, seed, ranges, i, gs, kind, prm)
                for i, (p, l, x, gs) in enumerate(zip(ps, logits, noisy, group_sizes))]
    if seed is None:
        seed = draw_seed(generator)
    linked = (link is not None and size_weights is not None and FUSE_SIZE_GRAD
              and torch.is_grad_enabled())
    stats = torch.empty((len(ps), 2), dtype=torch.float64) if linked and link.wants_stats() else None
    noisy, ranges = noise_forward_all(ps, logits, seed, group_sizes, kind, prm, names, allocs, as_they_are,
                                      None if layouts is None else layouts.noisy, stats)
    if not torch.is_grad_enabled():
        return noisy  # nothing to differentiate: no autograd nodes
    out, handles = _noisy_groups(ps, logits, noisy, seed, ranges, list(group_sizes), kind, prm, allocs,
                                 size_weights if linked else None, layouts)
    if handles is not None:
        link.set(handles, logits, size_weights, stats)
    return out


# The references to a gradient nobody else holds, as _owned_by_autograd
# sees them when _NoisyGroup.backward calls it: the engine's, the tuple of
# backward's arguments and its *grads copy, backward's local, the call's
# argument and getrefcount's own (7 on CPython 3.11). How many of these the
# interpreter counts is its own business (3.14 borrows references on its
# stack), so the number is measured at import (_calibrate_free_grad_refs)
# through that same call; None, and nothing updated in place, where the
# measurement fails.
_FREE_GRAD_REFS: tp.Optional[int] = None
# The same gradient's C++ use count (Tensor._use_count) there: 1 where the
# engine hands the gradient over (torch 2.13), 2 where it keeps its own
# reference through the call (torch 2.4). Measured with the references.
_FREE_GRAD_USES: tp.Optional[int] = None
# while measuring: where _owned_by_autograd puts the counts it sees
_REF_PROBE: tp.Optional[tp.List[tp.Tuple[int, int]]] = None


def _storage_holders(t: torch.Tensor) -> int:
    """How many references t's storage has, counted as _owned_by_autograd
    counts them (the temporary storage object included). Private torch."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _base_holders(view: torch.Tensor) -> tp.Tuple[int, int]:
    """The references to view's base, C++ and Python, counted the same way
    here and at import (the look at the base included). Private torch."""
    base = view._base
    return base._use_count(), sys.getrefcount(base)


def _alone_counts() -> tp.Optional[tp.Tuple[int, int, tp.Tuple[int, int]]]:
    """(storage holders of a tensor nobody else sees, of a view of a base
    nobody else sees, that base's holders), as this torch counts them; None
    where it does not offer the counts. Ordinary CPU tensors whatever the
    import runs under (in inference mode a view has no base)."""
    try:
        with torch.inference_mode(False):
            alone = torch.empty(4, device="cpu")
            view = torch.empty(8, device="cpu")[2:6]
            return _storage_holders(alone), _storage_holders(view), _base_holders(view)
    except Exception:  # noqa: BLE001 - no counts: never update in place
        return None


_ALONE = _alone_counts()


def _owned_by_autograd(grad: torch.Tensor) -> bool:
    """Whether `grad` is a dense buffer that only the autograd engine holds,
    so writing into it cannot be seen elsewhere: a contiguous float32 CPU
    tensor spanning all its storage (not a slice or an expanded scalar), not
    part of a double-backward graph, with no Python reference besides this
    call's (a hook that kept it would add one), and nothing else holding its
    memory: no alias or view of it kept (a hook that kept grad.detach() or
    grad.view(-1)), nothing else holding its base where it is itself a view
    (linear's weight gradient is a transpose of the matmul's result). The
    last two are the conditions torch's own input buffer checks before it
    accumulates in place, read through private counts (Tensor._use_count,
    torch._C._storage_Use_Count) measured against a tensor alone at import;
    without them, never in place."""
    if _REF_PROBE is not None:
        _REF_PROBE.append((sys.getrefcount(grad), grad._use_count()))
        return False
    if not (_ALONE is not None and _FREE_GRAD_USES is not None and grad.is_cpu and grad.dtype == torch.float32
            and grad.is_contiguous() and grad.storage_offset() == 0
            and grad.untyped_storage().nbytes() == grad.numel() * 4
            and not grad.requires_grad
            and sys.getrefcount(grad) <= _FREE_GRAD_REFS):
        return False
    alone, viewed, base_holders = _ALONE
    try:
        if grad._use_count() != _FREE_GRAD_USES:
            return False
        if grad._is_view():
            return _base_holders(grad) == base_holders and _storage_holders(grad) == viewed
        return _storage_holders(grad) == alone
    except Exception:  # noqa: BLE001 - a torch without the counts: not in place
        return False


def _group_rows(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """p as one row per group of values sharing bits (one row at group_size 0)."""
    return p.reshape(-1, p.numel() if group_size == 0 else group_size)


def _plus_noise(rows: torch.Tensor, logit: torch.Tensor, prm: BitsParam, source: torch.Tensor) -> torch.Tensor:
    """diffq's noisy weight in torch operators: rows plus the range times
    each row's step 1 / (2^bits - 1) times `source` (N(0, 1) / 2 or U(-1/2,
    1/2), rows' shape)."""
    step = 1 / (2 ** bits_from_logit(logit.reshape(-1, 1), prm) - 1)
    return rows + (rows.max() - rows.min()) * step * source


def _noisy_weight_torch(p, logit, group_size, noise, prm, generator=None):
    """The same formula with torch's RNG (or `generator`), for devices and
    dtypes the kernels do not take."""
    rows = _group_rows(p, group_size)
    if rows.dtype in (torch.float16, torch.bfloat16):
        # the range, the noise's law and the sum in float32, the result in
        # p's dtype: diffq hands a float32 weight to a float16 or bfloat16
        # model, whose matmul then refuses it
        rows = rows.float()
    if generator is None:
        source = torch.rand_like(rows) if noise == "uniform" else torch.randn_like(rows)
    else:
        draw = torch.rand if noise == "uniform" else torch.randn
        source = draw(rows.shape, generator=generator, device=generator.device,
                      dtype=rows.dtype).to(rows.device)
    source = source - 0.5 if noise == "uniform" else source / 2
    return _plus_noise(rows, logit, prm, source).to(p.dtype).view_as(p)


def noisy_weight(p: torch.Tensor, logit: torch.Tensor, group_size: int, noise: str,
                 prm: BitsParam, seed: int, name: str = "?",
                 generator: tp.Optional[torch.Generator] = None,
                 alloc: tp.Optional[Alloc] = None, kernels: bool = True) -> torch.Tensor:
    """One parameter's weight with pseudo quantization noise, differentiable
    in p and logit: the noise of parameter 0 of a forward seeded with
    `seed`. The torch path (other devices and dtypes, or `kernels` False)
    draws it from `generator` (torch's global one when None)."""
    if kernels and on_kernel_path(p, logit):
        kind = NOISE_KINDS[noise]
        allocs = [alloc] if alloc else None
        noisy, ranges = noise_forward_all([p], [logit], seed, [group_size], kind, prm, [name], allocs)
        return _noisy_groups([p], [logit], noisy, seed, ranges, [group_size], kind, prm, allocs)[0][0]
    if not torch.isfinite(p).all():
        raise ValueError(f"parameter {name!r} holds non-finite values (NaN or inf); "
                         "cannot add quantization noise")
    return _noisy_weight_torch(p, logit, group_size, noise, prm, generator)


class _StraightThrough(torch.autograd.Function):
    """`value` in the forward, the gradient passed to `p` unchanged."""

    @staticmethod
    def forward(ctx, p, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (detached, p's shape) seen as p by autograd."""
    return _StraightThrough.apply(p, value.detach())


# ---------------------------------------------------------------- size


def size_bits_all(logits: tp.Sequence[torch.Tensor], prm: "BitsParam") -> tp.List[tp.Tuple[float, float]]:
    """(sum of bits, largest bits) of each logit tensor, one kernel call."""
    return _C.size_forward_multi([_dense(l) for l in logits], tuple(prm), num_threads())


def size_grads_all(logits: tp.Sequence[torch.Tensor], scales: tp.Sequence[float], prm: "BitsParam",
                   allocs: tp.Optional[tp.Sequence[Alloc]] = None, share: bool = True) -> tp.List[torch.Tensor]:
    """scales[i] * d(bits)/d(logit) of each logit tensor, one kernel call.
    With `share` the small ones are views of one buffer (an operator's
    outputs may not alias each other: its callers pass False)."""
    if share:
        grads = [g if l.dim() == 1 else g.view(l.shape)
                 for g, l in zip(_vectors([l.numel() for l in logits], allocs), logits)]
    else:
        grads = [_empty_f32(l.shape) for l in logits]
    _C.size_backward_multi([_dense(l) for l in logits], grads, [float(s) for s in scales], tuple(prm),
                           num_threads())
    return grads


class _WeightedSumBits(torch.autograd.Function):
    """sum_i weight_i * sum(bits(logit_i)) over many logits in one autograd
    node and one kernel call each way; the largest bits of each logit as a
    second, non-differentiable output."""

    @staticmethod
    def forward(ctx, prm, weights, allocs, *logits):
        if compiling():
            total, tops = torch.ops.diffq_c.size_bits(list(logits), list(weights),
                                                      [float(v) for v in prm])
        else:
            stats = size_bits_all(logits, prm)
            total = torch.tensor(sum(w * s for w, (s, _) in zip(weights, stats)), dtype=torch.float32)
            tops = torch.tensor([top for _, top in stats], dtype=torch.float64)
        ctx.save_for_backward(*logits)
        ctx.prm, ctx.weights, ctx.allocs = prm, weights, allocs
        ctx.mark_non_differentiable(tops)
        return total, tops

    @staticmethod
    def backward(ctx, grad, _grad_tops):
        logits = ctx.saved_tensors
        if needs_torch_backward([grad]) and not compiling():
            sums = lambda *logits: [bits_from_logit(logit, ctx.prm).sum() for logit in logits]  # noqa: E731
            return (None, None, None, *torch_grads(sums, [grad * w for w in ctx.weights], logits))
        if compiling():
            grads = torch.ops.diffq_c.size_bits_backward(list(logits), list(ctx.weights), grad,
                                                         [float(v) for v in ctx.prm])
        else:
            g = float(grad)
            grads = size_grads_all(logits, [g * w for w in ctx.weights], ctx.prm, ctx.allocs)
        return (None, None, None, *grads)


class _SizeThroughGroups(torch.autograd.Function):
    """_WeightedSumBits' outputs, its gradient handed to the noisy groups'
    handles of the forward that made them (see _NoisyGroup), which add it
    to the logits' gradients of the noise."""

    @staticmethod
    def forward(ctx, prm, weights, logits, known, *handles):
        # `known`: the logits' size_bits_all from the forward, still theirs
        stats = size_bits_all(logits, prm) if known is None else known.tolist()
        total = torch.tensor(sum(w * s for w, (s, _) in zip(weights, stats)), dtype=torch.float32)
        tops = torch.tensor([top for _, top in stats], dtype=torch.float64)
        ctx.mark_non_differentiable(tops)
        ctx.count = len(handles)
        return total, tops

    @staticmethod
    def backward(ctx, grad, _grad_tops):
        return (None, None, None, None, *([grad] * ctx.count))


def weighted_sum_bits(logits: tp.Sequence[torch.Tensor], weights: tp.Sequence[float],
                      prm: BitsParam, allocs: tp.Optional[tp.Sequence[Alloc]] = None,
                      link: tp.Optional[SizeLink] = None
                      ) -> tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]]:
    """(sum_i weights[i] * sum(bits(logits[i])), differentiable; the max
    bits of each logit, a float64 tensor), or None when the kernels cannot
    take the logits. `allocs[i](shape)` gives the gradient of logits[i].
    With `link` (see SizeLink) the gradient goes through the last training
    forward's nodes when it can."""
    if not logits or not on_kernel_path(*logits):
        return None
    taken = link.take(logits, weights) if link is not None else None
    if taken is None:
        try:
            return _WeightedSumBits.apply(prm, tuple(weights), allocs, *logits)
        except RuntimeError:
            if transforms_active():
                return None  # the caller's torch formula
            raise
    handles, known = taken
    return _SizeThroughGroups.apply(prm, tuple(weights), tuple(logits), known, *handles)


def sum_bits(logit: torch.Tensor, prm: BitsParam) -> tp.Tuple[torch.Tensor, float]:
    """(sum of bits over the logits, differentiable; max bits as a float)."""
    kernels = weighted_sum_bits([logit], [1.0], prm)
    if kernels is not None:
        total, tops = kernels
        return total, float(tops[0])
    bits = bits_from_logit(logit, prm)
    return bits.sum(), bits.max().item()


# ------------------------------------------------------------ quantize


def _torch_levels(p: torch.Tensor, bits: torch.Tensor, mn: float, mx: float) -> torch.Tensor:
    """Levels by the float32 formula, for anything the kernels do not take
    (other devices or dtypes, fractional or broadcast bits)."""
    if mx == mn:
        return torch.zeros_like(p)
    step = 1 / ((2 ** bits.float()).long() - 1)
    return ((p - mn) / (mx - mn) / step).round()


def _row_bits(p: torch.Tensor, bits: torch.Tensor) -> tp.Optional[tp.Tuple[torch.Tensor, int]]:
    """Per-group integer bits as uint8 and the group size, when bits is a
    scalar or one value per row of a 2-D p; None otherwise."""
    if bits.numel() == 1:
        group_size = 0
    elif p.dim() == 2 and bits.shape in ((p.shape[0], 1), (p.shape[0],)):
        group_size = p.shape[1]
    else:
        return None
    b = bits.detach().reshape(-1).cpu()
    if b.is_floating_point():
        if not torch.equal(b, b.round()):
            return None
    if b.numel() and (b.min() < 1 or b.max() > 15):
        return None
    return b.to(torch.uint8).contiguous(), group_size


def quantize_levels(p: torch.Tensor, bits: torch.Tensor, name: str = "?"):
    """Levels in [0, 2^bits - 1] over the tensor's range, and (min, max).
    Levels are uint8 when every bits value is <= 8, else int16."""
    bits = torch.as_tensor(bits)
    if p.numel() == 0:
        raise ValueError(f"parameter {name!r} is empty; nothing to quantize")
    if bits.numel() and ((bits < 1).any() or (bits > 15).any()):
        raise ValueError(f"bits for {name!r} must lie in 1..15")
    small = bool((bits <= 8).all())
    rows = _row_bits(p, bits) if on_kernel_path(p) else None
    if rows is None:
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} holds non-finite values (NaN or inf); "
                             "cannot quantize it")
        mn, mx = p.min().item(), p.max().item()
        levels = _torch_levels(p, bits, mn, mx)
        return (levels.byte() if small else levels.short()), (mn, mx)
    b, group_size = rows
    flat = _flat(p)
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    levels = torch.empty(p.shape, dtype=torch.uint8 if small else torch.int16)
    _C.quantize(flat, b, levels.view(-1), group_size, mn, float(mx - mn), num_threads())
    return levels, (mn, mx)


def _check_scales(scales, name: str) -> tp.Tuple[float, float]:
    """(min, max) of a quantized tensor as two finite floats, min <= max."""
    try:
        if len(scales) != 2:
            raise ValueError
        mn, mx = float(scales[0]), float(scales[1])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"quantized state of {name!r}: scales must be (min, max), got "
                         f"{scales!r}") from None
    if not (math.isfinite(mn) and math.isfinite(mx) and mn <= mx):
        raise ValueError(f"quantized state of {name!r}: scales must be finite with "
                         f"min <= max, got ({mn}, {mx})")
    return mn, mx


def _dequantize_plan(levels, scales, bits, name):
    """(min, max, kernel (bits uint8, group_size) or None) for dequantizing,
    after the checks that need no pass over the levels."""
    if not isinstance(levels, torch.Tensor):
        raise TypeError(f"quantized state of {name!r}: levels must be a tensor, "
                        f"got {type(levels).__name__}")
    mn, mx = _check_scales(scales, name)
    bits = torch.as_tensor(bits)
    rows = None
    if _C is not None and levels.device.type == "cpu" and levels.dtype in (torch.uint8, torch.int16):
        rows = _row_bits(levels, bits)
    if rows is None and (levels.dtype.is_floating_point or levels.dtype.is_complex
                         or levels.dtype == torch.bool):
        raise TypeError(f"quantized state of {name!r}: levels must be integers, got {levels.dtype}")
    return mn, mx, bits, rows


def check_levels(levels: torch.Tensor, scales: tp.Tuple[float, float], bits: torch.Tensor,
                 name: str = "?") -> None:
    """Raise what dequantize_levels would raise, without computing anything:
    levels outside [0, 2^bits), bits outside 1..15, non-finite scales."""
    mn, mx, bits, rows = _dequantize_plan(levels, scales, bits, name)
    if rows is not None:
        try:
            _C.validate_levels(_flat(levels), rows[0], rows[1])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"quantized state of {name!r}: {exc}") from None
        return
    if bits.numel() and (bool((bits < 1).any()) or bool((bits > 15).any())):
        raise ValueError(f"quantized state of {name!r}: bits must lie in 1..15")
    top = (2 ** bits.float()).floor() - 1
    if levels.numel() and (bool((levels < 0).any()) or bool((levels.float() > top).any())):
        raise ValueError(f"quantized state of {name!r}: levels outside [0, 2^bits)")


def dequantize_levels(levels: torch.Tensor, scales: tp.Tuple[float, float],
                      bits: torch.Tensor, name: str = "?",
                      out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 weights back from levels: level * step * (max - min) + min,
    written into `out` when it is a contiguous float32 CPU tensor of the
    levels' size (restores write straight into the parameter). Levels and
    scales may come from a state on disk: levels outside [0, 2^bits) and
    non-finite scales are refused."""
    mn, mx, bits, rows = _dequantize_plan(levels, scales, bits, name)
    if rows is None:
        check_levels(levels, scales, bits, name)
        step = 1 / (2 ** bits.float() - 1)
        value = levels.float() * step * (mx - mn) + mn
        if out is not None:
            out.copy_(value.view_as(out))
            return out
        return value
    b, group_size = rows
    if out is None or not (out.device.type == "cpu" and out.dtype == torch.float32
                           and out.is_contiguous() and out.numel() == levels.numel()):
        target = torch.empty(levels.shape, dtype=torch.float32)
    else:
        target = out
    try:
        _C.dequantize(_flat(levels), b, target.view(-1), group_size, mn, float(mx - mn), num_threads())
    except ValueError as exc:
        raise ValueError(f"quantized state of {name!r}: {exc}") from None
    if out is not None and target is not out:
        out.copy_(target.view_as(out))
        return out
    return target


# ------------------------------------------------------------- bitpack


def pack_lines(values: int) -> int:
    """Lines of diffq's packed layout that `values` values take."""
    return (values + _C.PACK_LINE - 1) // _C.PACK_LINE


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """int16 values in [0, 2^nbits) into diffq's [lines, nbits, 32] int64 layout."""
    flat = _flat(values.to("cpu", torch.int16))
    out = torch.empty(pack_lines(flat.numel()), nbits, _C.PACK_BLOCK, dtype=torch.int64)
    _C.pack_bits(flat, out, nbits, num_threads())
    return out


def unpack_into(packed: torch.Tensor, out: torch.Tensor) -> None:
    """Unpack the first out.numel() values into out (contiguous int16)."""
    _C.unpack_bits(packed.detach().cpu().contiguous(), out.view(-1), num_threads())


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` int16 values of a packed tensor."""
    out = torch.empty(length, dtype=torch.int16)
    _C.unpack_bits(packed.detach().cpu().contiguous(), out, num_threads())
    return out


# ------------------------------------------------- stored bits, grouped packing


def stored_bits(logit: torch.Tensor, prm: BitsParam, extra_bits: float, name: str = "?",
                alloc: tp.Optional[Alloc] = None) -> torch.Tensor:
    """Integer bits stored for each group, uint8 in 1..15:
    clamp(round(extra_bits + bits(logit)), 1, 15), equal to torch's float32
    evaluation of that formula (the sigmoid is torch's own; `alloc(shape)`
    gives the float32 tensor it is written to)."""
    logit = logit.detach()
    if on_kernel_path(logit) and prm.mode == PARAM_MODES["bits"]:
        if alloc is not None:
            t = torch.sigmoid(logit, out=alloc(logit.shape)).view(-1)
        else:
            t = torch.sigmoid(logit).contiguous().view(-1)
        out = torch.empty(t.shape, dtype=torch.uint8)
        _C.stored_bits(t, out, prm.min_bits, prm.max_bits, float(extra_bits), num_threads())
        if logit.numel() and not bool(out.min() > 0):
            raise ValueError(f"bit logits of {name!r} hold non-finite values (NaN)")
        return out.view(logit.shape)
    bits = extra_bits + bits_from_logit(logit, prm)
    if not bool(torch.isfinite(bits).all()):
        raise ValueError(f"bit logits of {name!r} hold non-finite values (NaN)")
    return bits.round().clamp(1, 15).byte()


def _sigmoids(logits: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
    """torch.sigmoid of each logit tensor (torch's own, so stored bits match
    diffq's bit for bit), in one call where torch has the multi-tensor op."""
    foreach = getattr(torch, "_foreach_sigmoid", None)  # private: optional
    with torch.no_grad():
        if foreach is not None and _USE_FOREACH:
            return list(foreach(list(logits)))
        return [torch.sigmoid(l) for l in logits]


# _foreach_sigmoid is private torch; tests run with it off too
_USE_FOREACH = True


def quantize_all(ps: tp.Sequence[torch.Tensor], logits: tp.Sequence[torch.Tensor],
                 group_sizes: tp.Sequence[int], prm: "BitsParam", extra_bits: float,
                 names: tp.Sequence[str], allocs: tp.Optional[tp.Sequence[Alloc]] = None,
                 values: bool = True, shared_values: bool = False, with_bits: bool = True):
    """Eval quantization of every parameter in one kernel call: the stored
    bits of each (uint8, clamp(round(extra_bits + bits(logit)), 1, 15)), and
    with `values` its quantized values (a new contiguous float32 tensor of
    p's shape, from allocs[i] when given; with `shared_values`, those of
    small parameters are views of one buffer), the same numbers as
    dequantizing its levels. Returns (values or None, bits or None without
    `with_bits`, (min, max) of each p, per-width value counts when not
    `values`). p must be CPU float32, prm in the bits mode."""
    # every parameter's bits in one buffer (views of it), not one each
    counts = [l.numel() for l in logits]
    flat_bits = torch.empty(sum(counts), dtype=torch.uint8)
    outs = None
    out_args: tp.Tuple[tp.Any, tp.Sequence[int], tp.Sequence[int]] = (None, (), ())
    if values:
        small_max = SHARED_VECTOR_MAX if shared_values else 0
        shapes = tuple(p.shape for p in ps)  # torch.Size: a tuple already
        layout = _layout(shapes, small_max)
        outs, buffers = _views_of(layout, shapes, torch.float32, allocs)
        out_args = (buffers, layout.index, layout.offset)
    args = (_sigmoids(logits), flat_bits) + out_args + (
        list(group_sizes), prm.min_bits, prm.max_bits, float(extra_bits), not values, num_threads())
    # a non-contiguous p (channels_last, transposed) is copied only then
    mins, maxs, bad, nan_bits, totals = _dense_on_refusal(lambda ps: _C.quantize_multi(ps, *args), ps)
    if any(bad) or any(nan_bits):
        for name, b, nb in zip(names, bad, nan_bits):
            if nb:
                raise ValueError(f"bit logits of {name!r} hold non-finite values (NaN)")
            if b:
                raise ValueError(f"parameter {name!r} holds {b} non-finite values (NaN or inf); "
                                 "cannot quantize it")
    bits = None
    if with_bits:
        bits = [b if l.dim() == 1 else b.view(l.shape) for b, l in zip(flat_bits.split(counts), logits)]
    return outs, bits, list(zip(mins, maxs)), totals


def requantize(p: torch.Tensor, bits: torch.Tensor, group_size: int,
               name: str = "?", alloc: tp.Optional[Alloc] = None) -> tp.Optional[torch.Tensor]:
    """A new tensor (shape and strides of p) of p's quantized values, in one
    pass: the same numbers as dequantizing its levels; from `alloc(shape)`
    when given. None when the kernels cannot take p (the caller then goes
    the long way)."""
    if not (on_kernel_path(p) and p.is_contiguous() and bits.dtype == torch.uint8):
        return None
    flat = p.view(-1)
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    out = (alloc or _empty_f32)(p.shape)
    _C.requantize(flat, bits.contiguous().view(-1), out.view(-1), group_size, mn, float(mx - mn),
                  num_threads())
    return out


def split_by_width(levels: torch.Tensor, bits: torch.Tensor,
                   group_size: int) -> tp.Tuple[torch.Tensor, tp.List[int]]:
    """One int16 stream per bit width, laid out by increasing width: stream w
    is `levels[bits == w]` (rows of group_size). Returns the streams and the
    length of each."""
    streams = torch.empty(levels.numel(), dtype=torch.int16)
    totals = _C.split_by_width(_flat(levels), _flat(bits.to(torch.uint8)), streams, group_size,
                               num_threads())
    return streams, totals


def quantize_pack(p: torch.Tensor, bits: torch.Tensor, group_size: int, name: str = "?"
                  ) -> tp.Optional[tp.Tuple[tp.List[tp.Optional[torch.Tensor]], tp.List[int], float, float]]:
    """Levels of p (over its own range, widths `bits` per group) packed
    straight into diffq's per-width layout, without the levels in between:
    (packed levels of each width 0..15, None where no group has it; the
    number of values of each width; min; max). The same tensors as
    pack_bits of each stream of split_by_width. None when the kernels cannot
    take p."""
    if not on_kernel_path(p):
        return None
    flat = _flat(p)
    bits = _flat(bits.to(torch.uint8))
    mn, mx, bad = _C.value_range(flat, num_threads())
    if bad:
        raise ValueError(f"parameter {name!r} holds {bad} non-finite values (NaN or inf); "
                         "cannot quantize it")
    totals = _C.width_totals(bits, group_size, num_threads())
    outs = [torch.empty(pack_lines(total), w, _C.PACK_BLOCK, dtype=torch.int64) if total else None
            for w, total in enumerate(totals)]
    _C.quantize_pack(flat, bits, outs, group_size, mn, float(mx - mn), num_threads())
    return outs, totals, mn, mx


def restore_packed_all(packs, bits, outs, group_sizes, offset: int, mns, ranges, names) -> None:
    """Packed DiffQuantizer entries (diffq's layout) dequantized into outs
    (contiguous float32 CPU parameters), all checked before any is written
    (see the binding's restore_packed_multi)."""
    with torch.no_grad():
        _C.restore_packed_multi(packs, bits, outs, list(group_sizes), offset, mns, ranges, names, num_threads())


def width_planes(top: int) -> int:
    """Bit planes that values 0..top take (diffq's packed bits)."""
    return int(math.ceil(math.log2(1 + top))) if top > 0 else 0


def quantize_pack_all(ps, bits, group_sizes, ranges, totals, offset: int):
    """quantize_pack of every parameter in one call, from what quantize_all
    found (bits, (min, max) and values of each width): per parameter, the
    packed levels of each width 0..15 (None where no group has it) and its
    bits packed as bits - offset (pack_widths). The bits must be >= offset."""
    outs = [[torch.empty(pack_lines(t), w, _C.PACK_BLOCK, dtype=torch.int64) if t else None
             for w, t in enumerate(total)] for total in totals]
    widths_out = []
    for b, total in zip(bits, totals):
        top = max((w for w in range(16) if total[w]), default=offset) - offset
        widths_out.append(torch.empty(pack_lines(b.numel()), width_planes(top), _C.PACK_BLOCK, dtype=torch.int64))
    _C.quantize_pack_multi([_dense(p) for p in ps], bits, outs, list(group_sizes), [mn for mn, _ in ranges],
                           [float(mx - mn) for mn, mx in ranges], widths_out, offset, num_threads())
    return outs, widths_out


def pack_widths(widths: torch.Tensor, offset: int) -> torch.Tensor:
    """bitpack.pack(widths - offset) for uint8 widths, without the int16
    copy: diffq's packed bits of a state."""
    flat = _flat(widths)
    lo, hi = torch.aminmax(flat) if flat.numel() else (torch.tensor(offset), torch.tensor(offset))
    if int(lo) < offset:
        raise ValueError(f"widths below the offset {offset}")
    nbits = width_planes(int(hi) - offset)
    out = torch.empty(pack_lines(flat.numel()), nbits, _C.PACK_BLOCK, dtype=torch.int64)
    _C.pack_widths(flat, int(offset), out, nbits, num_threads())
    return out


def widths_from_stored(stored: torch.Tensor, offset: int) -> tp.Tuple[torch.Tensor, tp.List[int]]:
    """uint8 widths (stored + offset, each checked to be 1..15) and the
    count of each width, in one pass."""
    flat = _flat(stored.to(torch.int16))
    widths = torch.empty(flat.numel(), dtype=torch.uint8)
    counts = _C.widths_from_stored(flat, int(offset), widths, num_threads())
    return widths, counts


class PackedWidths:
    """Levels of a packed state left packed: packs[w] holds, in diffq's
    [lines, w, 32] layout, the levels of the groups of width w in group
    order (None for widths no group has), bits says which width each group
    has. Read from w bit planes, a level cannot fall outside [0, 2^w): there
    is nothing to check beyond the packs' sizes. `dequantize_into` goes from
    the packs straight to the weights; `materialize()` gives the
    [groups, group_size] int16 levels."""

    def __init__(self, packs: tp.Sequence[tp.Optional[torch.Tensor]], bits: torch.Tensor,
                 counts: tp.Sequence[int], group_size: int):
        self.packs = [None if p is None else p.detach().cpu().contiguous() for p in packs]
        self.bits = bits
        self.counts = list(counts)
        self.group_size = group_size
        self.shape = torch.Size((bits.numel(), group_size))

    def materialize(self) -> torch.Tensor:
        streams = torch.empty(self.bits.numel() * self.group_size, dtype=torch.int16)
        start = 0
        for width, count in enumerate(self.counts):
            values = count * self.group_size
            if values:
                unpack_into(self.packs[width], streams[start:start + values])
            start += values
        return merge_by_width(streams, self.bits, self.group_size)

    def dequantize_into(self, scales, out: torch.Tensor, name: str = "?") -> torch.Tensor:
        """dequantize_levels(materialize(), ...) straight from the packs."""
        mn, mx = _check_scales(scales, name)
        if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            _C.dequantize_packed(self.packs, _flat(self.bits), out.view(-1), self.group_size,
                                 mn, float(mx - mn), num_threads())
            return out
        return dequantize_levels(self.materialize(), scales, self.bits.view(-1, 1), name, out=out)


def merge_by_width(streams: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reverse of split_by_width: int16 levels [groups, group_size]."""
    levels = torch.empty(bits.numel(), group_size, dtype=torch.int16)
    _C.merge_by_width(streams, _flat(bits.to(torch.uint8)), levels.view(-1), group_size,
                      num_threads())
    return levels


# ------------------------------------------------------ torch.library ops
#
# What torch.compile (and anything else that traces) sees of the quantizer:
# multi-tensor operators with a schema, a fake implementation for tracing
# and, for the size penalty, autograd. The noise forward has no autograd of
# its own: each parameter's noisy weight goes through _NoisyWeightOp, whose
# backward is the per-parameter noise_backward, so gradients still arrive
# layer by layer. Eager training calls the same implementations directly
# (noise_forward_all, ...): a dispatcher call costs ~3 us, and they can use
# kept memory (scratch.py) that a schema cannot express.


def _prm_of(param: tp.Sequence[float]) -> BitsParam:
    mode, min_bits, max_bits, log_min, log_max = param
    return BitsParam(int(mode), float(min_bits), float(max_bits), float(log_min), float(log_max))


def _op_noise_forward(p, logit, seed, group_size, kind, param, name):
    return noise_forward_all(p, logit, int(seed), group_size, kind, _prm_of(param), name)


def _op_noise_backward(grad, p, logit, seed, ranges, index, group_size, kind, param):
    rng = [int(v) if k >= 2 else float(v) for k, v in enumerate(ranges[index].tolist())]
    return noise_backward_one(grad, p, logit, int(seed), index, group_size, kind, _prm_of(param), rng)


def _op_size_bits(logit, weight, param):
    stats = size_bits_all(logit, _prm_of(param))
    total = torch.tensor(sum(w * s for w, (s, _) in zip(weight, stats)), dtype=torch.float32)
    return total, torch.tensor([top for _, top in stats], dtype=torch.float64)


def _op_size_bits_backward(logit, weight, grad, param):
    g = float(grad)
    return size_grads_all(logit, [g * w for w in weight], _prm_of(param), share=False)


def _op_quantize(p, logit, group_size, param, extra_bits, name):
    return quantize_all(p, logit, group_size, _prm_of(param), extra_bits, name)[0]


def _contiguous_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _register_ops() -> tp.Optional[torch.library.Library]:
    if _C is None or not hasattr(torch, "library") or not hasattr(torch.library, "Library"):
        return None
    # torch < 2.2 has neither: the operators then run eagerly only
    register_fake = (getattr(torch.library, "register_fake", None)
                     or getattr(torch.library, "impl_abstract", None) or (lambda *a, **k: (lambda fn: fn)))
    lib = torch.library.Library("diffq_c", "DEF")
    lib.define("noise_forward(Tensor[] p, Tensor[] logit, Tensor seed, int[] group_size, int kind, "
               "float[] param, str[] name) -> (Tensor[], Tensor)")
    lib.define("noise_backward(Tensor grad, Tensor p, Tensor logit, Tensor seed, Tensor ranges, int index, "
               "int group_size, int kind, float[] param) -> (Tensor, Tensor)")
    lib.define("size_bits(Tensor[] logit, float[] weight, float[] param) -> (Tensor, Tensor)")
    lib.define("size_bits_backward(Tensor[] logit, float[] weight, Tensor grad, float[] param) -> Tensor[]")
    lib.define("quantize(Tensor[] p, Tensor[] logit, int[] group_size, float[] param, float extra_bits, "
               "str[] name) -> Tensor[]")
    for name, fn in (("noise_forward", _op_noise_forward), ("noise_backward", _op_noise_backward),
                     ("size_bits", _op_size_bits), ("size_bits_backward", _op_size_bits_backward),
                     ("quantize", _op_quantize)):
        lib.impl(name, fn, "CPU")

    @register_fake("diffq_c::noise_forward", lib=lib)
    def _(p, logit, seed, group_size, kind, param, name):
        return ([_contiguous_like(t) for t in p],
                torch.empty((len(p), RANGE_FIELDS), dtype=torch.float64, device="cpu"))

    @register_fake("diffq_c::noise_backward", lib=lib)
    def _(grad, p, logit, seed, ranges, index, group_size, kind, param):
        return _contiguous_like(p), _contiguous_like(logit)

    @register_fake("diffq_c::size_bits", lib=lib)
    def _(logit, weight, param):
        return (torch.empty((), dtype=torch.float32, device="cpu"),
                torch.empty((len(logit),), dtype=torch.float64, device="cpu"))

    @register_fake("diffq_c::size_bits_backward", lib=lib)
    def _(logit, weight, grad, param):
        return [_contiguous_like(t) for t in logit]

    @register_fake("diffq_c::quantize", lib=lib)
    def _(p, logit, group_size, param, extra_bits, name):
        return [_contiguous_like(t) for t in p]

    register_autograd = getattr(torch.library, "register_autograd", None)
    if register_autograd is not None:
        def setup_context(ctx, inputs, output):
            logit, weight, param = inputs
            ctx.save_for_backward(*logit)
            ctx.weight, ctx.param = weight, param
            ctx.mark_non_differentiable(output[1])

        def backward(ctx, grad, _grad_tops):
            grads = torch.ops.diffq_c.size_bits_backward(list(ctx.saved_tensors), list(ctx.weight), grad,
                                                         list(ctx.param))
            return list(grads), None, None

        register_autograd("diffq_c::size_bits", backward, setup_context=setup_context, lib=lib)
    return lib


_LIBRARY = _register_ops()


def _calibrate_free_grad() -> tp.Optional[tp.Tuple[int, int]]:
    """The reference and use counts _owned_by_autograd sees for an incoming
    gradient nobody else holds: one training step of a small parameter through
    _NoisyGroup's backward, whose gradient comes fresh from a multiply. No
    draw from torch's generator (an explicit seed), no OpenMP team (one
    chunk of values), float32 CPU tensors whatever torch's defaults (a
    float64 or CUDA default would send the step down the torch path and
    leave nothing measured)."""
    global _REF_PROBE
    if _C is None:
        return None
    seen: tp.List[tp.Tuple[int, int]] = []
    _REF_PROBE = seen
    try:
        with torch.inference_mode(False), torch.enable_grad():
            where = dict(dtype=torch.float32, device="cpu")
            p = torch.linspace(-1.0, 1.0, IN_PLACE_MIN, **where).requires_grad_()
            logit = torch.zeros(IN_PLACE_MIN // 8, **where, requires_grad=True)
            noisy = noisy_weight(p, logit, 8, "gaussian", BitsParam.make("bits", 2, 8), 0)
            (noisy * 2.0).sum().backward()
    except Exception:  # noqa: BLE001 - no measurement: never in place
        return None
    finally:
        _REF_PROBE = None
    return seen[0] if len(seen) == 1 else None


_FREE_GRAD_REFS, _FREE_GRAD_USES = _calibrate_free_grad() or (None, None)
