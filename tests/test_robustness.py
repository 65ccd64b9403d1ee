"""Robustness of the quantizers: non-finite weights, degenerate and unusual
tensors, tied weights, failed forwards, and corrupted or mismatched states.

Every refusal must be a clear error naming the parameter, and must leave
the model exactly as it was: "bitwise" below compares the raw bytes of every
parameter and buffer (so NaN compares equal to itself) and the identity of
the Parameter objects held by each module.
"""
import copy
import io
import typing as tp

import diffq
import pytest
import torch
from torch import nn

import diffq_c
from diffq_c import bitpack


# ------------------------------------------------------------- helpers


class Snapshot:
    """The raw bytes of every parameter and buffer of a model and which
    Parameter object each module holds."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.bytes = {name: _raw(t) for name, t in _tensors(model)}
        self.objects = {(id(m), name): p for m in model.modules()
                        for name, p in m._parameters.items()}

    def assert_unchanged(self):
        now = dict(_tensors(self.model))
        assert sorted(now) == sorted(self.bytes), "parameters were added or removed"
        for name, raw in self.bytes.items():
            assert torch.equal(_raw(now[name]), raw), f"{name} changed"
        for m in self.model.modules():
            for name, p in m._parameters.items():
                held = self.objects.get((id(m), name))
                assert p is held, f"{type(m).__name__}.{name} is no longer the original Parameter"


def _tensors(model):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers()


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _diffq(model, **kwargs):
    kwargs.setdefault("min_size", 0.0)
    q = diffq_c.DiffQuantizer(model, **kwargs)
    q.no_optimizer()
    return q


# ------------------------------------------------------ non-finite weights


BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def _poison(model, value):
    with torch.no_grad():
        model[2].weight[3, 5] = value


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("when", ["eval_forward", "train_forward", "get_quantized_state"])
@pytest.mark.parametrize("kind", ["diffq", "uniform"])
def test_non_finite_weight_is_refused(value, when, kind):
    model = _mlp()
    if kind == "diffq":
        quantizer = _diffq(model)
    else:
        # qat: training forwards quantize too
        quantizer = diffq_c.UniformQuantizer(model, min_size=0.0, qat=True)
    _poison(model, value)
    model.train(when == "train_forward")
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"'2\.weight'.*non-finite"):
        if when == "get_quantized_state":
            quantizer.get_quantized_state()
        else:
            model(torch.randn(3, 16))
    snap.assert_unchanged()
    # the model recovers as soon as the weight is finite again
    with torch.no_grad():
        model[2].weight[3, 5] = 0.0
    model(torch.randn(3, 16))
    quantizer.get_quantized_state()


def test_real_diffq_turns_a_tensor_with_nan_into_nan():
    """The oracle is wrong here: diffq 0.2.4 quantizes a tensor holding one
    NaN into all NaN without a word, where diffq_c refuses."""
    model = _mlp()
    quantizer = diffq.DiffQuantizer(model, min_size=0.0)
    quantizer.no_optimizer()
    _poison(model, float("nan"))
    model.eval()
    quantizer.quantize()
    assert bool(torch.isnan(model[2].weight).all())
    assert model[2].weight.numel() > 1
    quantizer.unquantize()


@pytest.mark.parametrize("group_size", [0, 1, 4])
def test_constant_tensor_quantizes_and_restores_exactly(group_size):
    model = nn.Linear(16, 8)
    with torch.no_grad():
        model.weight.fill_(0.3)
        model.bias.fill_(-1.7)
    quantizer = _diffq(model, group_size=group_size)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if "diffq" not in n}
    with quantizer.enter_quantize():
        for name, value in expected.items():
            assert torch.equal(getattr(model, name), value), name
    for packed in (False, True):
        state = quantizer.get_quantized_state(packed=packed)
        other = nn.Linear(16, 8)
        diffq_c.restore_quantized_state(other, state)
        for name, value in expected.items():
            assert torch.equal(getattr(other, name), value), name
    # uniform too
    quantizer.detach()
    uq = diffq_c.UniformQuantizer(model, bits=3, min_size=0.0)
    other = nn.Linear(16, 8)
    diffq_c.restore_quantized_state(other, uq.get_quantized_state())
    assert torch.equal(other.weight, expected["weight"])


# ------------------------------------------------- unusual tensor shapes


class OddShapes(nn.Module):
    """An empty, a 1-element, an odd-sized and a just-over-one-pack-line
    parameter."""

    def __init__(self, seed=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.empty = nn.Parameter(torch.zeros(0, 3))
        self.one = nn.Parameter(torch.tensor([0.7]))
        self.odd = nn.Parameter(torch.randn(7, 13, generator=g))
        self.line = nn.Parameter(torch.randn(2049, generator=g))

    def forward(self, x):
        return x * self.one + self.odd.sum() + self.line.mean() + self.empty.sum()


@pytest.mark.parametrize("group_size", [0, 1])
def test_empty_one_element_and_odd_sizes_match_diffq(group_size):
    """Quantized weights and packed states equal diffq's on the non-empty
    parameters; the empty one is never quantized (diffq fails on it when
    min_size lets it through, here min_size=-1 does)."""
    results = {}
    for lib in (diffq, diffq_c):
        model = OddShapes()
        quantizer = lib.DiffQuantizer(model, min_size=0.0, group_size=group_size, init_bits=5)
        quantizer.no_optimizer()
        with torch.no_grad():
            for qparam in quantizer._qparams:
                qparam.logit.uniform_(-3, 3, generator=torch.Generator().manual_seed(1))
        model.train()
        model(torch.randn(3)).sum().backward()
        with quantizer.enter_quantize():
            results[lib] = [p.detach().clone() for p in (model.one, model.odd, model.line)]
        assert [qp.name for qp in quantizer._qparams] == ["one", "odd", "line"]
    for ours, theirs in zip(results[diffq_c], results[diffq]):
        assert torch.equal(ours, theirs)
    assert torch.equal(results[diffq_c][0], torch.tensor([0.7]))

    model = OddShapes()
    quantizer = _diffq(model, min_size=-1.0, group_size=group_size)
    assert "empty" not in [qp.name for qp in quantizer._qparams]
    model.eval()
    model(torch.randn(3))
    other = OddShapes(seed=4)
    diffq_c.restore_quantized_state(other, quantizer.get_quantized_state())
    with quantizer.enter_quantize():
        for name in ("one", "odd", "line"):
            assert torch.equal(getattr(other, name), getattr(model, name)), name


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_channels_last_fails_in_diffq():
    model = _convnet().to(memory_format=torch.channels_last)
    quantizer = diffq.DiffQuantizer(model, min_size=0.0, group_size=4)
    quantizer.no_optimizer()
    model.eval()
    with pytest.raises(RuntimeError, match="view"):
        model(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("group_size", [0, 4])
def test_channels_last_matches_contiguous(group_size):
    """Noise, quantized weights and states do not depend on the memory
    layout: element i is element i of the logical (contiguous) order."""
    runs = {}
    for layout in ("contiguous", "channels_last"):
        model = _convnet()
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        quantizer = _diffq(model, group_size=group_size)
        seen = []
        model[0].register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
        x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(5))
        model.train()
        torch.manual_seed(11)  # the noise seed
        model(x).square().mean().backward()
        logit_grad = model[0].weight_diffq.grad.clone()
        weight_grad = model[0].weight.grad.clone()
        model.eval()
        out = model(x)
        with quantizer.enter_quantize():
            quantized = model[0].weight.detach().clone()
        state = quantizer.get_quantized_state(packed=True)
        runs[layout] = (seen[0], quantized, state, out, logit_grad, weight_grad)
    (noisy_a, quant_a, state_a, out_a, lg_a, wg_a) = runs["contiguous"]
    (noisy_b, quant_b, state_b, out_b, lg_b, wg_b) = runs["channels_last"]
    assert torch.equal(noisy_a, noisy_b)
    assert torch.equal(quant_a, quant_b)
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(state_a["quantized"], buf_a)
    torch.save(state_b["quantized"], buf_b)
    assert buf_a.getvalue() == buf_b.getvalue()
    # convolutions may sum in another order for another layout
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg_a, lg_b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(wg_a, wg_b, rtol=1e-4, atol=1e-7)
    # and the channels_last state restores into a contiguous model
    other = _convnet(seed=1)
    diffq_c.restore_quantized_state(other, state_b)
    assert torch.equal(other[0].weight, quant_a)


def test_transposed_parameter_matches_contiguous():
    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for transposed in (False, True):
        model = nn.Linear(16, 8)
        weight = base.t().contiguous().t() if transposed else base.clone()
        assert weight.is_contiguous() != transposed
        model.weight = nn.Parameter(weight)
        quantizer = _diffq(model, group_size=4)
        with quantizer.enter_quantize():
            results.append(model.weight.detach().clone())
        assert model.weight.is_contiguous() != transposed  # layout kept
    assert torch.equal(results[0], results[1])


class Tied(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.emb(x))))


@pytest.mark.parametrize("detect_bound", [True, False])
def test_tied_weights(detect_bound):
    model = Tied()
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.0, group_size=4,
                                      detect_bound=detect_bound)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "diffq" not in n],
                                 lr=1e-2)
    quantizer.setup_optimizer(optimizer)
    logits = optimizer.param_groups[-1]["params"]
    # one logit per stored tensor, each once: a duplicate would be stepped twice
    assert len({id(p) for p in logits}) == len(logits) == (3 if detect_bound else 4)
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        loss = model(x).logsumexp(-1).mean() + 1e-3 * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.out.weight is model.emb.weight
    state = quantizer.get_quantized_state(packed=True)
    # with detect_bound the tied tensor is stored once
    assert len(state["quantized"]) == (3 if detect_bound else 4)
    model.eval()
    expected = model(x)
    other = Tied(seed=1)
    diffq_c.restore_quantized_state(other, state)
    assert other.out.weight is other.emb.weight
    other.eval()
    with quantizer.enter_quantize():
        assert torch.equal(other.emb.weight, model.emb.weight)
    assert torch.equal(other(x), expected)


# --------------------------------------------------- failing forwards


@pytest.mark.parametrize("training", [True, False])
def test_forward_that_raises_leaves_the_model_clean(training):
    """A forward that raises in the model itself (here a wrong input shape)
    must not leave noisy (training) or quantized (eval) weights in place."""
    model = _mlp()
    quantizer = _diffq(model)
    model.train(training)
    snap = Snapshot(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 5))
    snap.assert_unchanged()
    model(torch.randn(3, 16))  # and the next forward works
    snap.assert_unchanged()
    quantizer.detach()


def test_failed_construction_leaves_no_logits():
    model = nn.Linear(40, 30)  # weight divisible by 8, bias (30) not
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="bias"):
        diffq_c.DiffQuantizer(model, min_size=0.0, group_size=8)
    snap.assert_unchanged()
    diffq_c.DiffQuantizer(model, min_size=0.0, group_size=10)  # a second try works


# ---------------------------------------------------- corrupted states


class Net(nn.Module):
    def __init__(self, seed=0, width=64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(width, 64)      # 4096 weights: two packed lines at 8 bits
        self.head = nn.Linear(64, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.head(torch.relu(self.fc(x))))


def _trained_diffq_state(packed):
    model = Net()
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.001, group_size=4, float16=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for qparam in quantizer._qparams:  # a spread of bit widths
            qparam.logit.uniform_(-1.5, 1.5, generator=g)
            # and 2400 values at 8 bits: a packed tensor of two lines
            qparam.logit[:600] = quantizer._init_logit()
    return quantizer.get_quantized_state(packed=packed)


def _first_packed(entry):
    """Index of the first non-empty packed level tensor of a packed entry."""
    return next(i for i, t in enumerate(entry[0]) if t is not None)


def _replace(state, index, new_entry):
    state = copy.deepcopy(state)
    state["quantized"][index] = new_entry
    return state


def _packed_corruptions(state):
    fc = state["quantized"][0]
    all_packed, scales, packed_bits = fc
    k = _first_packed(fc)
    width = k + 1
    cases = {}

    def with_levels(i, t):
        lst = list(all_packed)
        lst[i] = t
        return (lst, scales, packed_bits)

    biggest = max((i for i, t in enumerate(all_packed) if t is not None),
                  key=lambda i: all_packed[i].shape[0])
    assert all_packed[biggest].shape[0] >= 2
    cases["truncated_lines"] = with_levels(biggest, all_packed[biggest][:-1].clone())
    cases["truncated_block"] = with_levels(k, all_packed[k][:, :, :16].clone())
    cases["packed_int32"] = with_levels(k, all_packed[k].to(torch.int32))
    cases["packed_float"] = with_levels(k, all_packed[k].double())
    cases["packed_2d"] = with_levels(k, all_packed[k].view(-1, 32))
    cases["packed_not_tensor"] = with_levels(k, all_packed[k].tolist())
    # levels that do not fit their width: planes above `width` set
    wide = bitpack.pack(torch.full((all_packed[k].shape[0] * 2048,), 2 ** width + 1), width + 2)
    cases["levels_out_of_range"] = with_levels(k, wide)
    cases["missing_width"] = with_levels(k, None)
    cases["too_many_widths"] = (list(all_packed) + [None, None], scales, packed_bits)
    cases["bits_truncated"] = (all_packed, scales, packed_bits[:, :, :16].clone())
    cases["bits_lines_missing"] = (all_packed, scales, packed_bits[:0].clone())
    # stored bits - min_bits = 15: 17 bits
    cases["bits_too_large"] = (all_packed, scales, bitpack.pack(torch.full((1024,), 15), 4))
    cases["bits_not_tensor"] = (all_packed, scales, None)
    cases["scales_nan"] = (all_packed, (float("nan"), 1.0), packed_bits)
    cases["scales_inf"] = (all_packed, (0.0, float("inf")), packed_bits)
    cases["scales_reversed"] = (all_packed, (1.0, -1.0), packed_bits)
    cases["scales_string"] = (all_packed, "ab", packed_bits)
    cases["scales_three"] = (all_packed, (0.0, 1.0, 2.0), packed_bits)
    cases["entry_none"] = None
    cases["entry_short"] = (all_packed, scales)
    cases["levels_not_list"] = (torch.zeros(3), scales, packed_bits)
    return cases


def _unpacked_corruptions(state):
    levels, scales, bits = state["quantized"][0]
    cases = {}
    bad = levels.clone().to(torch.int16)
    g = int(torch.nonzero(bits < 8)[0])
    bad[g, 0] = 2 ** int(bits[g])
    cases["level_too_large"] = (bad, scales, bits)
    neg = levels.clone().to(torch.int16)
    neg[0, 0] = -1
    cases["level_negative"] = (neg, scales, bits)
    cases["level_float"] = (levels.float() + 0.5, scales, bits)
    cases["level_int64_out_of_range"] = (levels.long() + 2 ** 16, scales, bits)
    cases["levels_reshaped"] = (levels.reshape(-1, 8), scales, bits)
    cases["levels_list"] = (levels.tolist(), scales, bits)
    cases["bits_zero"] = (levels, scales, torch.zeros_like(bits))
    cases["bits_sixteen"] = (levels.short(), scales, torch.full_like(bits, 16))
    cases["bits_wrong_count"] = (levels, scales, bits[:-1])
    cases["bits_uint8_levels_with_9_bits"] = (levels, scales, torch.full_like(bits, 9))
    cases["scales_nan"] = (levels, (0.0, float("nan")), bits)
    cases["entry_none"] = None
    cases["entry_long"] = (levels, scales, bits, bits)
    return cases


PACKED_CASES = sorted(_packed_corruptions(_trained_diffq_state(True)))
UNPACKED_CASES = sorted(_unpacked_corruptions(_trained_diffq_state(False)))


def _restore_fails(state, match, module_level=False):
    """Restoring raises a ValueError matching `match`; the target model and
    its quantizer stay as they were."""
    model = Net(seed=7)
    if module_level:
        snap = Snapshot(model)
        with pytest.raises(ValueError, match=match):
            diffq_c.restore_quantized_state(model, state)
        snap.assert_unchanged()
        return
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.001, group_size=4, float16=True)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=match):
        quantizer.restore_quantized_state(state)
    snap.assert_unchanged()


@pytest.mark.parametrize("case", PACKED_CASES)
def test_corrupted_packed_state(case):
    state = _trained_diffq_state(True)
    bad = _replace(state, 0, _packed_corruptions(state)[case])
    _restore_fails(bad, r"'fc\.weight'")
    _restore_fails(bad, r"'fc\.weight'", module_level=True)


@pytest.mark.parametrize("case", UNPACKED_CASES)
def test_corrupted_unpacked_state(case):
    state = _trained_diffq_state(False)
    bad = _replace(state, 0, _unpacked_corruptions(state)[case])
    _restore_fails(bad, r"'fc\.weight'")


def test_valid_states_restore():
    """The baseline the corruption cases vary: valid states restore."""
    for packed in (False, True):
        state = _trained_diffq_state(packed)
        model = Net(seed=7)
        diffq_c.restore_quantized_state(model, state)
        ref = Net()
        quantizer = diffq_c.DiffQuantizer(ref, min_size=0.001, group_size=4, float16=True)
        quantizer.restore_quantized_state(state)
        assert torch.equal(model.fc.weight, ref.fc.weight)


def _mismatch_cases():
    state = _trained_diffq_state(True)
    cases = {}
    other = Net(width=32)  # fc.weight: 2048 values instead of 4096
    q = diffq_c.DiffQuantizer(other, min_size=0.001, group_size=4, float16=True)
    cases["another_model_same_count"] = (q.get_quantized_state(), r"'fc\.weight'")
    q.detach()
    deeper = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    q = diffq_c.DiffQuantizer(deeper, min_size=0.001, group_size=4)
    cases["another_model_more_params"] = (q.get_quantized_state(), "another model")
    s = copy.deepcopy(state)
    s["quantized"].pop()
    cases["quantized_missing"] = (s, "quantized")
    s = copy.deepcopy(state)
    s["float16"][0] = torch.zeros(3, dtype=torch.float16)
    cases["float16_wrong_shape"] = (s, "float16")
    s = copy.deepcopy(state)
    s["float16"][0] = "weights"
    cases["float16_not_tensor"] = (s, "float16")
    s = copy.deepcopy(state)
    s["float16"][-1] = torch.empty(s["float16"][-1].shape, device="meta")
    cases["float16_meta_device"] = (s, "float16")
    s = copy.deepcopy(state)
    s["quantized"] = torch.zeros(2)
    cases["quantized_not_list"] = (s, "list")
    s = copy.deepcopy(state)
    s["meta"]["init_kwargs"]["group_size"] = 8
    cases["other_group_size"] = (s, r"'fc\.weight'")
    return cases


MISMATCH_CASES = _mismatch_cases()


@pytest.mark.parametrize("case", sorted(MISMATCH_CASES))
def test_mismatched_state(case):
    state, match = MISMATCH_CASES[case]
    _restore_fails(state, match, module_level=True)
    if case != "other_group_size":
        _restore_fails(state, match)


@pytest.mark.parametrize("bad", ["not a state", {"quantized": []}, {"meta": "x"},
                                 {"meta": {"klass": dict, "init_kwargs": {}}},
                                 {"meta": {"klass": print, "init_kwargs": {}}}],
                         ids=["str", "no_meta", "meta_str", "klass_dict", "klass_function"])
def test_state_that_is_not_a_state(bad):
    """The class named in a state is called: only quantizer classes are."""
    _restore_fails(bad, "state|meta|klass", module_level=True)


UNIFORM_CASES = {
    "levels_reshaped": lambda lv, sc: (lv.reshape(32, 128), sc),
    "levels_out_of_range": lambda lv, sc: (lv.short() + 1000, sc),
    "scales_nan": lambda lv, sc: (lv, (float("nan"), 0.0)),
    "levels_float": lambda lv, sc: (lv.float(), sc),
    "entry_short": lambda lv, sc: (lv,),
}


@pytest.mark.parametrize("case", sorted(UNIFORM_CASES))
def test_corrupted_uniform_state(case):
    model = Net()
    state = diffq_c.UniformQuantizer(model, bits=6, min_size=0.001).get_quantized_state(packed=False)
    levels, scales = state["quantized"][0]
    bad = _replace(state, 0, UNIFORM_CASES[case](levels, scales))
    target = Net(seed=3)
    snap = Snapshot(target)
    with pytest.raises(ValueError, match=r"'fc\.weight'"):
        diffq_c.restore_quantized_state(target, bad)
    snap.assert_unchanged()


def test_corrupted_uniform_packed_state():
    model = Net()
    state = diffq_c.UniformQuantizer(model, bits=6, min_size=0.001).get_quantized_state()
    packed, scales = state["quantized"][0]
    assert packed.shape[0] == 2
    for bad_packed in (packed[:1].clone(), packed[:, :3].clone(), packed.float(), None,
                       torch.cat([packed, torch.zeros_like(packed[:1])])):
        bad = _replace(state, 0, (bad_packed, scales))
        target = Net(seed=3)
        snap = Snapshot(target)
        with pytest.raises(ValueError, match=r"'fc\.weight'"):
            diffq_c.restore_quantized_state(target, bad)
        snap.assert_unchanged()


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("kind", ["diffq", "uniform"])
def test_strict_checks_accept_real_diffq_states(packed, kind):
    """The checks above refuse nothing diffq 0.2.4 writes: its states
    restore into diffq_c with the weights diffq itself restores."""
    source = Net()
    if kind == "diffq":
        quantizer = diffq.DiffQuantizer(source, min_size=0.001, group_size=4, float16=True)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for qparam in quantizer._qparams:
                qparam.logit.uniform_(-1.5, 1.5, generator=g)
    else:
        quantizer = diffq.UniformQuantizer(source, bits=5, min_size=0.001)
    state = quantizer.get_quantized_state(packed=packed)
    ours, theirs = Net(seed=7), Net(seed=7)
    diffq_c.restore_quantized_state(ours, state)
    diffq.restore_quantized_state(theirs, state)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- load with assign=True


def _same_structure(a, b) -> bool:
    """Equal nested states: tensors equal in dtype and values, the rest ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
    return a == b


def _quantizer_of(lib, name, model):
    # min_size leaves the last layer's bias small: float16 / others follow too
    kwargs = {"min_size": 0.0001, "float16": True}
    if name == "DiffQuantizer":
        kwargs["group_size"] = 4
    quantizer = getattr(lib, name)(model, **kwargs)
    if hasattr(quantizer, "no_optimizer"):
        quantizer.no_optimizer()
    return quantizer


def _source(name):
    """A model whose weights and quantizer parameters moved from their
    initial values, its quantizer and state dict."""
    model = _mlp(seed=1)
    quantizer = _quantizer_of(diffq_c, name, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, quantizer, model.state_dict()


def _assert_loaded_like(model, quantizer, source, source_quantizer, x):
    """The same eval output and quantized state as the source's."""
    source.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert _same_structure(quantizer.get_quantized_state(packed=True),
                           source_quantizer.get_quantized_state(packed=True))


@pytest.mark.parametrize("name", ["DiffQuantizer", "LSQ", "UniformQuantizer"])
def test_load_with_assign_is_followed(name):
    """load_state_dict(..., assign=True) puts new Parameter objects in the
    modules. diffq keeps quantizing and saving the old ones: its eval
    forward and its state silently ignore what was loaded. Ours follow."""
    source, source_quantizer, state = _source(name)
    x = torch.randn(3, 16)
    source.eval()
    with torch.no_grad():
        want = source(x)
    want_state = source_quantizer.get_quantized_state(packed=True)

    theirs = _mlp(seed=2)
    _quantizer_of(diffq, name, theirs)
    theirs.load_state_dict(state, assign=True)
    theirs.eval()
    with torch.no_grad():
        assert not torch.equal(theirs(x), want)

    model = _mlp(seed=2)
    quantizer = _quantizer_of(diffq_c, name, model)
    model.eval()
    with torch.no_grad():
        model(x)  # layouts and caches worked out on the old parameters
    model.load_state_dict(state, assign=True)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert _same_structure(quantizer.get_quantized_state(packed=True), want_state)
    if name != "UniformQuantizer":
        # a training forward draws the same noise on the same values
        source.train()
        model.train()
        torch.manual_seed(5)
        noisy_source = source(x)
        torch.manual_seed(5)
        assert torch.equal(model(x), noisy_source)
    # a load in place (the default) keeps the objects and is seen as before
    before = [p for p in model.parameters()]
    model.load_state_dict(_mlp(seed=3).state_dict(), strict=False)
    assert all(a is b for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["DiffQuantizer", "LSQ", "UniformQuantizer"])
def test_model_built_on_meta_then_loaded(name):
    """The large-model recipe: build under torch.device("meta") (no
    memory), quantizer included, then load the weights with assign=True.
    diffq cannot build a DiffQuantizer there (its logits' initial value is
    a meta tensor's item())."""
    source, source_quantizer, state = _source(name)
    if name == "DiffQuantizer":
        with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
            diffq.DiffQuantizer(_mlp(seed=2), min_size=0.0001, group_size=4)
    with torch.device("meta"):
        model = _mlp(seed=2)
        quantizer = _quantizer_of(diffq_c, name, model)
    model.load_state_dict(state, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    _assert_loaded_like(model, quantizer, source, source_quantizer, torch.randn(3, 16))


def test_detach_removes_the_load_hooks():
    model = _mlp()
    quantizer = _quantizer_of(diffq_c, "DiffQuantizer", model)
    quantizer.detach()
    assert not any(module._load_state_dict_post_hooks for module in model.modules())


class _TiedAcrossLevels(nn.Module):
    """Two ties whose first names sit on the root, loaded after the child
    that holds the second names: a large table (quantized) and a small
    bias (kept aside), each shared with the child Linear."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Parameter(torch.randn(20, 8))
        self.shift = nn.Parameter(torch.randn(20))
        self.out = nn.Linear(8, 20)
        self.out.weight, self.out.bias = self.table, self.shift

    def forward(self, x):
        return self.out(x) + self.table.sum(1) + self.shift


class _TiedSiblings(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x.abs().long() % 20).sum(1))


@pytest.mark.parametrize("make", [_TiedAcrossLevels, _TiedSiblings])
@pytest.mark.parametrize("name", ["DiffQuantizer", "LSQ"])
def test_load_with_assign_keeps_ties(make, name):
    """assign=True gives each name a Parameter of its own, which unties a
    tied weight; the quantizer, made on the tie (one logit or scale, one
    state), ties the names again, whichever module loads first."""
    kwargs = {"min_size": 0.0001, "group_size": 4} if name == "DiffQuantizer" else {"min_size": 0.0001}
    source = make(seed=1)
    source_quantizer = getattr(diffq_c, name)(source, **kwargs)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1)
    model = make(seed=2)
    quantizer = getattr(diffq_c, name)(model, **kwargs)
    model.load_state_dict(source.state_dict(), assign=True)
    assert model.out.weight is next(p for n, p in model.named_parameters() if n != "out.weight"
                                    and p.shape == model.out.weight.shape)
    if make is _TiedAcrossLevels:
        assert model.out.bias is model.shift
    _assert_loaded_like(model, quantizer, source, source_quantizer, torch.randn(3, 8))


def test_load_with_assign_keeps_the_small_list_of_a_tie_half_excluded():
    """A tied tensor quantized under its first name and excluded under its
    second: its small site is not in the state's `others`, before a load
    with assign=True as after it."""
    source = _TiedSiblings(seed=1)
    source_quantizer = diffq_c.DiffQuantizer(source, min_size=0, group_size=4, exclude=["out.weight"])
    model = _TiedSiblings(seed=2)
    quantizer = diffq_c.DiffQuantizer(model, min_size=0, group_size=4, exclude=["out.weight"])
    assert quantizer._others == []
    model.load_state_dict(source.state_dict(), assign=True)
    assert quantizer._others == []
    _assert_loaded_like(model, quantizer, source, source_quantizer, torch.randn(3, 8))
