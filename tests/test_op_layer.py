"""The multi-tensor op layer: torch.library operators (opcheck), torch.compile
of a quantized model (no graph break, eval identical to eager), gradients
arriving layer by layer, the multi-tensor kernels equal to the per-tensor
ones, and eval forwards that reuse their quantized weights."""
import copy

import pytest
import torch
from torch import nn

import diffq_c
from diffq_c import _C, ops


def _mlp(widths=(16, 32, 32, 8)):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _quantized(model, group_size=8, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.0, group_size=group_size, **kwargs)
    quantizer.setup_optimizer(optimizer)
    with torch.no_grad():
        for qp in quantizer._qparams:
            qp.logit.uniform_(-3.0, 3.0)
    return quantizer, optimizer


PRM = ops.BitsParam.make("bits", 2, 15)


def _op_args(n=(24, 8), group_size=(4, 8)):
    ps = [torch.randn(k) for k in n]
    logits = [torch.randn(k // g if g else 1) for k, g in zip(n, group_size)]
    return ps, logits


# ------------------------------------------------------------------ opcheck


def test_opcheck_noise_forward_and_backward():
    ps, logits = _op_args()
    seed = torch.tensor(1234)
    prm = [float(v) for v in PRM]
    torch.library.opcheck(torch.ops.diffq_c.noise_forward.default,
                          (ps, logits, seed, [4, 8], 1, prm, ["a", "b"]))
    _, ranges = torch.ops.diffq_c.noise_forward(ps, logits, seed, [4, 8], 1, prm, ["a", "b"])
    torch.library.opcheck(torch.ops.diffq_c.noise_backward.default,
                          (torch.randn(8), ps[1], logits[1], seed, ranges, 1, 8, 1, prm))


def test_opcheck_size_bits_with_autograd_and_quantize():
    _, logits = _op_args()
    prm = [float(v) for v in PRM]
    grad_logits = [l.clone().requires_grad_() for l in logits]
    torch.library.opcheck(torch.ops.diffq_c.size_bits.default, (grad_logits, [4.0, 8.0], prm))
    torch.library.opcheck(torch.ops.diffq_c.size_bits_backward.default,
                          (logits, [4.0, 8.0], torch.tensor(0.5), prm))
    ps, logits = _op_args()
    torch.library.opcheck(torch.ops.diffq_c.quantize.default, (ps, logits, [4, 8], prm, 0.0, ["a", "b"]))


def test_size_bits_gradient_matches_autograd_of_the_formula():
    _, logits = _op_args()
    weights = [4.0, 8.0]
    ours = [l.clone().requires_grad_() for l in logits]
    total, tops = torch.ops.diffq_c.size_bits(ours, weights, [float(v) for v in PRM])
    total.backward()
    ref = [l.clone().double().requires_grad_() for l in logits]
    ref_total = sum(w * ops.bits_from_logit(l, PRM).sum() for w, l in zip(weights, ref))
    ref_total.backward()
    torch.testing.assert_close(total.double(), ref_total.detach(), rtol=1e-6, atol=1e-4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tops, torch.stack([ops.bits_from_logit(l, PRM).max() for l in ref]).detach(),
                               rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------ torch.compile


def _graph_breaks(model, x):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_break_count, explained.break_reasons


# on a torch whose compiler does not follow the hooks (before 2.5) the
# quantizer refuses torch.compile: test_compile_is_refused_where_it_would_be_wrong
needs_hooks_followed = pytest.mark.skipif(
    not ops.compile_follows_hooks(), reason=f"torch {torch.__version__}: compile refused (needs 2.5)")


def test_compile_is_refused_where_it_would_be_wrong(monkeypatch):
    """torch 2.4's compiler ran a forward on the float weights (the noisy or
    quantized ones the hooks put in were not seen), silently. There the
    quantizer raises from the compiled call instead, before swapping
    anything; the eager model still works. Simulated on a torch that follows
    the hooks; as it is on one that does not."""
    if ops.compile_follows_hooks():
        monkeypatch.setattr(ops, "compile_follows_hooks", lambda: False)
        # as built on a torch that can refuse (ops._outside_traces)
        monkeypatch.setattr(ops, "refuse_traced_forward", torch.compiler.disable(ops._refuse_traced_forward))
    torch.manual_seed(0)
    model = _mlp()
    quantizer, _ = _quantized(model)
    before = [p.detach().clone() for p in model.parameters()]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(8, 16)
    for training in (True, False):
        model.train(training)
        with pytest.raises(RuntimeError, match="needs torch >= 2.5"):
            compiled(x)
        assert all(type(m.weight) is nn.Parameter for m in model if isinstance(m, nn.Linear))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.train()
    model(x).sum().backward()  # eagerly, as before
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


def test_compile_follows_hooks_from_torch_2_5():
    release = ops.TORCH_RELEASE
    assert ops.compile_follows_hooks() == (release >= (2, 5))


def test_import_leaves_dynamo_alone():
    """import diffq_c does not import torch._dynamo (about 1 s) where the
    refusal cannot be reached (torch >= 2.13)."""
    import subprocess
    import sys
    code = "import sys, torch, diffq_c; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    release = ops.TORCH_RELEASE
    assert out.stdout.strip() == str(release < (2, 13))


@needs_hooks_followed
@pytest.mark.parametrize("group_size", [8, 0])
def test_compiled_model_trains_and_evals_without_graph_breaks(group_size):
    torch.manual_seed(0)
    model = _mlp()
    quantizer, optimizer = _quantized(model, group_size=group_size)
    x = torch.randn(8, 16)
    compiled = torch.compile(model)
    for _ in range(2):
        loss = compiled(x).pow(2).mean() + 1e-3 * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())
    model.train()
    breaks, reasons = _graph_breaks(model, x)
    assert breaks == 0, reasons
    model.eval()
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(compiled(x), eager)
    breaks, reasons = _graph_breaks(model, x)
    assert breaks == 0, reasons
    # the eager eval after a compiled one still sees the float weights after
    assert all(p.data_ptr() == qp.param.data_ptr()
               for p, qp in zip([m.weight for m in model if isinstance(m, nn.Linear)],
                                quantizer._qparams[::2]))


@needs_hooks_followed
def test_compiled_training_equals_eager_on_an_eager_backend():
    """With the aot_eager backend the same ops run in the same order: the
    compiled step gives the eager step's outputs and gradients."""
    torch.manual_seed(0)
    model = _mlp()
    twin = copy.deepcopy(model)
    q1, _ = _quantized(model)
    q2, _ = _quantized(twin)
    for a, b in zip(q1._qparams, q2._qparams):
        b.logit.data.copy_(a.logit.data)
    x = torch.randn(8, 16)
    compiled = torch.compile(twin, backend="aot_eager")
    torch.manual_seed(5)
    out = model(x)
    (out.pow(2).mean() + 1e-3 * q1.model_size()).backward()
    torch.manual_seed(5)
    out2 = compiled(x)
    (out2.pow(2).mean() + 1e-3 * q2.model_size()).backward()
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    for p, r in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------- gradients arrive early


def _arrival_order(model, quantized, x):
    order = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    if quantized:
        _quantized(model)
    torch.manual_seed(1)
    model(x).pow(2).sum().backward()
    return [n for n in order if not n.endswith("_diffq")]


def test_gradients_arrive_layer_by_layer_as_without_the_quantizer():
    """Layers of 1 MiB each: each weight's gradient is accumulated as soon
    as backward leaves its layer, before earlier layers' backward, in the
    order of a plain model's backward (last layer first), which
    DistributedDataParallel relies on to reduce buckets while backward goes
    on."""
    torch.manual_seed(0)
    plain = _mlp((512,) * 5)
    ours = copy.deepcopy(plain)
    x = torch.randn(2, 512)
    expected = _arrival_order(plain, False, x)
    got = _arrival_order(ours, True, x)
    assert got == expected
    assert got[0].startswith("6.") and got[-1].startswith("0.")


def test_gradients_of_small_layers_arrive_by_groups_of_at_most_one_mebibyte():
    """Small consecutive parameters share a backward node (one kernel call):
    their gradients arrive together, once backward has left the group's
    first layer; a group never holds more than GRAD_GROUP_BYTES unless it
    is one parameter."""
    numels = [10, 20, 262144, 5, 262000, 200, 100, 300000, 1]
    groups = ops.grad_groups(numels)
    assert groups == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8), (8, 9)]
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(numels)))
    for a, b in groups:
        assert b - a == 1 or 4 * sum(numels[a:b]) <= ops.GRAD_GROUP_BYTES
    # a big layer between small ones: its gradient comes before theirs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 512), nn.Linear(512, 512), nn.Linear(512, 8))
    order = _arrival_order(model, True, torch.randn(2, 8))
    assert order.index("2.weight") < order.index("1.weight")
    assert order.index("3.weight") < order.index("2.weight")


def test_the_fast_autograd_entry_is_optional_and_exact(monkeypatch):
    """The noisy groups enter autograd under Function.apply's Python wrapper
    (a speed path, ops.FAST_APPLY): taken outside functorch's transforms,
    and training with it off gives bitwise the same weights, logits and
    gradients, with and without model_size() in the loss. From torch 2.14
    Function.apply is itself the C entry (the wrapper's work moved into it),
    so both paths enter the same way there and must still agree."""
    assert ops._NOISY_GROUP_APPLY is not None
    public_apply, calls = ops._NoisyGroup.apply, []

    def counting_apply(*args):
        calls.append(len(args))
        return public_apply(*args)

    # the public path calls _NoisyGroup.apply; the speed path, the entry it
    # took at import, does not
    monkeypatch.setattr(ops._NoisyGroup, "apply", counting_apply)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(ops, "FAST_APPLY", fast)
        calls.clear()
        torch.manual_seed(0)
        model = _mlp()
        quantizer, optimizer = _quantized(model)
        x = torch.randn(4, 16)
        grads = []
        for step in range(4):
            optimizer.zero_grad()
            loss = model(x).pow(2).sum()
            if step % 2:
                loss = loss + 1e-2 * quantizer.model_size()
            loss.backward()
            grads += [p.grad.clone() for p in model.parameters()]
            optimizer.step()
        # a noisy group has 2 arguments and 2 per parameter
        groups = [n for n in calls if n == 2 + 2 * len(quantizer._qparams)]
        assert (len(groups) == 0) == fast, calls
        results.append(([p.detach().clone() for p in model.parameters()], grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


def test_strided_incoming_gradients_give_the_gradients_of_dense_ones():
    """The groups' backward hands the incoming gradients to the binding as
    they are: an expanded one (of a sum) or a transposed one is refused
    before anything is written and the retry copies it, with the gradients
    a dense incoming gradient of the same values gives."""
    contiguous = {}

    def record(key):
        def hook(grad):
            contiguous[key] = grad.is_contiguous()
        return hook

    class Sums(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64))
            self.v = nn.Parameter(torch.randn(8, 8))

        def forward(self, dense):
            # the noisy weights here: what reaches them is what the groups' backward gets
            self.w.register_hook(record((dense, "w")))
            self.v.register_hook(record((dense, "v")))
            if dense:  # the same values as dense tensors
                return ((self.w * torch.full((64,), 3.0)).sum()
                        + (self.v * torch.arange(64.).view(8, 8).t().contiguous()).sum())
            return self.w.sum() * 3.0 + (self.v.t() * torch.arange(64.).view(8, 8)).sum()

    grads = []
    for dense in (True, False):
        torch.manual_seed(0)
        model = Sums()
        quantizer, _ = _quantized(model)
        torch.manual_seed(1)
        model(dense).backward()
        grads.append([t.grad.clone() for t in model.parameters()])
    assert contiguous == {(True, "w"): True, (True, "v"): True, (False, "w"): False, (False, "v"): False}
    assert len(grads[0]) == 4  # the two weights and their logits
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# -------------------------------------------------- multi-tensor = per-tensor


@pytest.mark.parametrize("group_size", [1, 8, 0])
def test_multi_tensor_noise_equals_per_tensor_kernel(group_size):
    """One call over many tensors (sizes across chunk borders) gives each
    tensor what the single-tensor driver gives it with its derived seed,
    for any thread count."""
    sizes = [8, 40, 65536 + 24, 3 * 65536, 16]
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(n, generator=gen) for n in sizes]
    logits = [torch.randn(n // group_size if group_size else 1, generator=gen) for n in sizes]
    seed = 0x1234_5678_9ABC
    results = []
    for threads in (1, 2):
        noisy = [torch.empty(n) for n in sizes]
        ranges = torch.empty(len(sizes), 7, dtype=torch.float64)
        _C.noise_forward_multi(ps, logits, noisy, [group_size] * len(sizes), 1, seed, tuple(PRM), ranges, threads)
        results.append((noisy, ranges))
    for i, n in enumerate(sizes):
        single = torch.empty(n)
        rng = _C.noise_forward(ps[i], logits[i], single, group_size, 1, _C.derive_seed(seed, i), tuple(PRM), 1)
        for noisy, ranges in results:
            assert torch.equal(noisy[i], single)
            assert ranges[i].tolist() == [float(v) for v in rng]


def test_multi_tensor_size_and_quantize_equal_per_tensor_kernels():
    sizes = [8, 65536 * 2 + 8, 24]
    gen = torch.Generator().manual_seed(4)
    logits = [torch.randn(n, generator=gen) * 3 for n in sizes]
    stats = _C.size_forward_multi(logits, tuple(PRM), 2)
    grads = [torch.empty(n) for n in sizes]
    _C.size_backward_multi(logits, grads, [0.5, 2.0, -1.0], tuple(PRM), 2)
    for logit, stat, grad, scale in zip(logits, stats, grads, [0.5, 2.0, -1.0]):
        assert tuple(stat) == tuple(_C.size_forward(logit, tuple(PRM), 1))
        single = torch.empty_like(logit)
        _C.size_backward(logit, single, scale, tuple(PRM), 1)
        assert torch.equal(grad, single)
    ps = [torch.randn(n * 8, generator=gen) for n in sizes]
    values, bits, ranges, _ = ops.quantize_all(ps, logits, [8] * 3, PRM, 0.5, ["a", "b", "c"])
    for p, logit, value, b, (mn, mx) in zip(ps, logits, values, bits, ranges):
        expected_bits = ops.stored_bits(logit, PRM, 0.5)
        assert torch.equal(b, expected_bits)
        assert torch.equal(value, ops.requantize(p, expected_bits, 8))
        assert (mn, mx) == (p.min().item(), p.max().item())


def test_non_finite_weights_are_named_and_nothing_is_swapped():
    model = _mlp()
    quantizer, _ = _quantized(model)
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="'2.weight' holds 1 non-finite"):
        model(torch.randn(2, 16))
    assert all(isinstance(m.weight, nn.Parameter) for m in model if isinstance(m, nn.Linear))
    model.eval()
    with pytest.raises(ValueError, match="'2.weight' holds 1 non-finite"):
        model(torch.randn(2, 16))
    assert all(qp.param.data_ptr() == qp.module.weight.data_ptr() for qp in quantizer._qparams[::2])


# ----------------------------------------------------------- eval reuse


def _count_quantizations(monkeypatch):
    calls = []
    real = ops.quantize_all

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "quantize_all", counting)
    return calls


def _fresh_eval(model, quantizer, x):
    """The eval output of a copy of the model with a quantizer that keeps
    nothing, the same weights and logits."""
    twin = _mlp()
    q = diffq_c.DiffQuantizer(twin, min_size=0.0, group_size=quantizer.group_size,
                              extra_bits=quantizer.extra_bits)
    q.cache_eval = False
    with torch.no_grad():
        for a, b in zip(q._qparams, quantizer._qparams):
            a.logit.copy_(b.logit)
            a.param.copy_(b.param)
    twin.eval()
    with torch.no_grad():
        return twin(x)


@pytest.mark.parametrize("cache", [True, False])
def test_a_validation_loop_quantizes_once(monkeypatch, cache):
    """With the cache (the default) a loop of eval forwards quantizes once,
    without it on every forward; the outputs are the same either way."""
    model = _mlp()
    quantizer, _ = _quantized(model)
    quantizer.cache_eval = cache
    calls = _count_quantizations(monkeypatch)
    model.eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        outs = [model(x) for _ in range(5)]
    assert len(calls) == (1 if cache else 5)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(outs[0], _fresh_eval(model, quantizer, x))


@pytest.mark.parametrize("change", ["adam_step", "fused_adam_step", "sgd_step", "load_state_dict",
                                    "no_grad_edit", "data_assignment", "data_transposed", "logit_edit",
                                    "extra_bits"])
def test_every_change_is_noticed(monkeypatch, change):
    torch.manual_seed(0)
    model = _mlp()
    quantizer, _ = _quantized(model)
    x = torch.randn(4, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
    calls = _count_quantizations(monkeypatch)
    weight = model[2].weight
    if change.endswith("_step"):
        cls = torch.optim.SGD if change == "sgd_step" else torch.optim.Adam
        kwargs = {"fused": True} if change == "fused_adam_step" else {}
        opt = cls([weight], lr=0.1, **kwargs)
        weight.grad = torch.ones_like(weight)
        opt.step()
    elif change == "load_state_dict":
        state = copy.deepcopy(model.state_dict())
        state["2.weight"] += 0.5
        model.load_state_dict(state)
    elif change == "no_grad_edit":
        with torch.no_grad():
            weight.mul_(1.5)
    elif change == "data_assignment":
        weight.data = weight.data * 1.5
    elif change == "data_transposed":
        # the same memory and version counter, another layout (a square weight)
        weight.data = weight.data.t()
    elif change == "logit_edit":
        with torch.no_grad():
            quantizer._qparams[2].logit.add_(2.0)
    else:
        quantizer.extra_bits = 1
    with torch.no_grad():
        after = model(x)
    assert len(calls) == 1
    assert not torch.equal(after, before)
    assert torch.equal(after, _fresh_eval(model, quantizer, x))


def test_an_edit_through_data_needs_clear_eval_cache():
    """`.data` edits bypass version counters (torch's own rule); the
    documented remedy is clear_eval_cache()."""
    model = _mlp()
    quantizer, _ = _quantized(model)
    model.eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        model(x)
        model[0].weight.data.mul_(2.0)
        quantizer.clear_eval_cache()
        assert torch.equal(model(x), _fresh_eval(model, quantizer, x))


@pytest.mark.parametrize("use_foreach", [True, False])
def test_stored_bits_with_and_without_foreach_sigmoid(monkeypatch, use_foreach):
    """_foreach_sigmoid is private torch: the per-tensor sigmoid gives the
    same bits."""
    monkeypatch.setattr(ops, "_USE_FOREACH", use_foreach)
    gen = torch.Generator().manual_seed(9)
    logits = [torch.randn(n, generator=gen) * 4 for n in (7, 64, 1000)]
    ps = [torch.randn(n * 4, generator=gen) for n in (7, 64, 1000)]
    _, bits, _, _ = ops.quantize_all(ps, logits, [4] * 3, PRM, 0.0, ["a", "b", "c"])
    for b, logit in zip(bits, logits):
        expected = (ops.bits_from_logit(logit, PRM)).round().clamp(1, 15).byte()
        assert torch.equal(b, expected)


def test_model_size_follows_a_changed_extra_bits():
    """model_size keeps its per-parameter terms between calls; a setting
    changed after a call is still taken into account."""
    torch.manual_seed(0)
    model = _mlp()
    quantizer, _ = _quantized(model)
    before = float(quantizer.model_size().detach())
    quantizer.extra_bits = 2
    after = float(quantizer.model_size().detach())
    twin = _mlp()
    fresh = diffq_c.DiffQuantizer(twin, min_size=0.0, group_size=8, extra_bits=2)
    with torch.no_grad():
        for a, b in zip(fresh._qparams, quantizer._qparams):
            a.logit.copy_(b.logit)
    assert after > before
    assert after == pytest.approx(float(fresh.model_size()), rel=1e-6)


def test_layout_and_dtype_changes_after_a_cached_eval_are_followed():
    """Eval values kept from the C kernels serve only tensors of the layout,
    dtype and device they were made for: a weight made non-contiguous, the
    model moved to float64 and back, each eval equals a fresh quantizer's."""
    torch.manual_seed(1)
    model = _mlp()
    quantizer, _ = _quantized(model)
    x = torch.randn(4, 16)
    model.eval()

    def check(inputs):
        with torch.no_grad():
            out = model(inputs)
        twin = _mlp()
        q = diffq_c.DiffQuantizer(twin, min_size=0.0, group_size=8)
        q.cache_eval = False
        twin.to(inputs.dtype)  # the logits too, as model.double() moved them
        with torch.no_grad():
            for a, b in zip(q._qparams, quantizer._qparams):
                a.logit.copy_(b.logit)
                a.param.data = b.param.detach().clone()  # its layout too (float64 matmuls differ by it)
        twin.eval()
        with torch.no_grad():
            assert torch.equal(out, twin(inputs))
        return out

    first = check(x)
    weight = model[2].weight
    weight.data = weight.data.t().contiguous().t()  # same values, column-major
    assert not weight.is_contiguous()
    assert torch.equal(check(x), first)
    seen = []
    handle = model[2].register_forward_pre_hook(lambda m, i: seen.append((m.weight.stride(), m.weight.dtype)))
    model.double()
    check(x.double())
    model.float()
    assert torch.equal(check(x), first)
    handle.remove()
    assert seen == [((1, 32), torch.float64), ((1, 32), torch.float32)]


def test_small_eval_values_share_one_buffer_and_large_ones_have_their_own():
    """quantize_all(shared_values=True): the values of parameters under
    SHARED_VECTOR_MAX values are views of one buffer, laid out by shape;
    each equals the per-tensor kernel's."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 16), (16,), (8, 4, 2), (16, 16), (ops.SHARED_VECTOR_MAX,), (16,)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    logits = [torch.randn(p.numel() // 8, generator=gen) * 3 for p in ps]
    names = [str(i) for i in range(len(ps))]
    values, bits, ranges, _ = ops.quantize_all(ps, logits, [8] * len(ps), PRM, 0.0, names,
                                               shared_values=True, with_bits=False)
    assert bits is None
    storages = [v.untyped_storage().data_ptr() for v in values]
    small = [i for i, p in enumerate(ps) if p.numel() < ops.SHARED_VECTOR_MAX]
    assert len({storages[i] for i in small}) == 1
    assert storages[4] not in {storages[i] for i in small}
    for p, logit, value, (mn, mx) in zip(ps, logits, values, ranges):
        assert value.shape == p.shape and value.is_contiguous()
        assert torch.equal(value, ops.requantize(p, ops.stored_bits(logit, PRM, 0.0), 8))
        assert (mn, mx) == (p.min().item(), p.max().item())
    plain, plain_bits, _, _ = ops.quantize_all(ps, logits, [8] * len(ps), PRM, 0.0, names)
    assert all(torch.equal(a, b) for a, b in zip(plain, values))
    assert len({v.untyped_storage().data_ptr() for v in plain}) == len(ps)
    assert [tuple(b.shape) for b in plain_bits] == [tuple(l.shape) for l in logits]
