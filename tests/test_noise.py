"""The noise op: its law, reproducibility, thread invariance, and gradients
equal to torch autograd of diffq's formula given the same noise."""
import re
from pathlib import Path

import pytest
import torch

import diffq_c
from diffq_c import _C, ops

KINDS = {"uniform": 0, "gaussian": 1}


def our_noise(kind, seed, n, index=0):
    """The noise parameter `index` of a forward seeded with `seed` gets."""
    out = torch.empty(n)
    _C.noise_fill(out, KINDS[kind], _C.derive_seed(seed, index), 0, 1)
    return out


def _splitmix_seed(base, index):
    """splitmix64 of base + (index + 1) golden-ratio increments, in Python."""
    mask = (1 << 64) - 1
    z = (base + 0x9E3779B97F4A7C15 * (index + 1)) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("base,index", [(0, 0), (987654321, 0), (2 ** 63 - 5, 3), (2 ** 64 - 1, 199)])
def test_per_parameter_seeds_are_splitmix64(base, index):
    """Each parameter's seed is splitmix64 of the forward's seed and its
    index, as a second implementation computes it."""
    assert _C.derive_seed(base, index) == _splitmix_seed(base, index)


def diffq_formula(p, logit, group_size, source, prm):
    """diffq 0.2.4's training forward written out in torch, with a given
    noise source in place of its randn/rand draw."""
    bits = ops.bits_from_logit(logit, prm)[:, None]
    rows = p.view(1, -1) if group_size == 0 else p.view(-1, group_size)
    scale = rows.max() - rows.min()
    unit = 1 / (2 ** bits - 1)
    return (rows + scale * unit * source.view_as(rows)).view_as(p)


def with_ties(n, generator):
    p = torch.randn(n, generator=generator)
    if n >= 8:
        top, bottom = p.max().item(), p.min().item()
        p[[1, n // 2, n - 1]] = top  # three-way tie at the max
        p[[0, 3]] = bottom  # two-way tie at the min
    return p


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("param", ["bits", "noise"])
# 3 * 2**16 + 64: ties at the max in three of four kernel chunks, at the min in the first
@pytest.mark.parametrize("group_size,n", [(0, 96), (1, 96), (8, 96), (8, 4096), (0, 1), (1, 5), (8, 3 * 2**16 + 64)])
def test_gradients_equal_autograd_of_diffq_formula(kind, param, group_size, n):
    gen = torch.Generator().manual_seed(n + group_size)
    prm = ops.BitsParam.make(param, 2, 15)
    groups = 1 if group_size == 0 else n // group_size
    p = with_ties(n, gen).requires_grad_()
    logit = (torch.rand(groups, generator=gen) * 6 - 3).requires_grad_()
    seed = 987654321
    ours = ops.noisy_weight(p, logit, group_size, kind, prm, seed)
    # the reference in float64: the kernels sum a group's gradient in double,
    # and a float32 reference's own rounding would exceed rtol wherever the
    # group's terms nearly cancel
    p_ref = p.detach().double().requires_grad_()
    logit_ref = logit.detach().double().requires_grad_()
    ref = diffq_formula(p_ref, logit_ref, group_size, our_noise(kind, seed, n).double(), prm)
    # the kernels' step uses a polynomial exp2 (relative error ~2e-7); the
    # noise recovered as noisy - p carries one rounding of p + noise
    one_rounding = torch.finfo(torch.float32).eps * p.detach().abs().max().item()
    torch.testing.assert_close(ours - p.detach(), ref.detach().float() - p.detach(), rtol=1e-5,
                               atol=one_rounding)
    upstream = torch.randn(n, generator=gen)
    ours.backward(upstream)
    ref.backward(upstream.double())
    torch.testing.assert_close(p.grad, p_ref.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logit.grad, logit_ref.grad.float(), rtol=1e-5, atol=1e-9)


def test_ties_share_the_gradient_through_the_scale():
    # all elements tied: the gradients through max and min cancel exactly
    p = torch.full((16,), 0.5, requires_grad=True)
    logit = torch.zeros(1, requires_grad=True)
    out = ops.noisy_weight(p, logit, 0, "gaussian", ops.BitsParam.make("bits", 2, 15), 5)
    assert torch.equal(out, p.detach())  # zero range, zero noise
    out.sum().backward()
    assert torch.equal(p.grad, torch.ones(16))


def test_uniform_noise_law():
    z = our_noise("uniform", 11, 1 << 20)
    assert z.min() >= -0.5 and z.max() < 0.5
    assert abs(z.mean().item()) < 2e-3
    assert abs(z.var().item() - 1 / 12) < 1e-3


def test_gaussian_noise_law():
    z = our_noise("gaussian", 12, 1 << 20)
    assert abs(z.mean().item()) < 2e-3
    assert abs(z.var().item() - 0.25) < 2e-3
    # tails of N(0, 1/4): P(|z| > 1) = P(|N(0,1)| > 2) ~ 4.55 %
    assert abs((z.abs() > 1).float().mean().item() - 0.0455) < 2e-3
    # successive elements are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5e-3


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_fast_and_reference_noise_agree(kind):
    for start in (0, 1, 3, 4097):
        for n in (1, 2, 3, 5, 7, 1023, 70000):
            fast, ref = torch.empty(n), torch.empty(n)
            _C.noise_fill(fast, KINDS[kind], 77, start, 2)
            _C.noise_fill(ref, KINDS[kind], 77, start, 1, reference=True)
            assert torch.equal(fast, ref)  # the same float formulas, the same bits


def train_forward_outputs(threads, seed=0, steps=2):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(300, 700)  # 210k weights: several kernel chunks
    model = torch.nn.Sequential(layer)
    quantizer = diffq_c.DiffQuantizer(model, group_size=4, min_size=0)
    quantizer.no_optimizer()
    captured = []
    # the inner layer sees the noisy weight the quantizer swapped in
    layer.register_forward_hook(lambda m, i, o: captured.append(m.weight.detach().clone()))
    x = torch.randn(2, 300)
    for _ in range(steps):
        model(x).sum().backward()
    assert not torch.equal(captured[0], layer.weight)
    return captured, layer.weight.grad.clone(), layer.weight_diffq.grad.clone()


def test_noise_same_for_one_and_two_threads():
    one = train_forward_outputs(1)
    two = train_forward_outputs(2)
    for a, b in zip(one[0], two[0]):
        assert torch.equal(a, b)
    # gradients through the kernels do not depend on threads either
    assert torch.equal(one[1], two[1]) or torch.allclose(one[1], two[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(one[2], two[2])


def test_manual_seed_reproduces_and_steps_differ():
    first = train_forward_outputs(2, seed=3)
    again = train_forward_outputs(2, seed=3)
    other = train_forward_outputs(2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[0][1])  # fresh noise every step


def test_philox_known_answers():
    assert _C.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)
    assert _C.philox4x32_10((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0)) == \
        (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)


def test_cpu_float64_and_fallback_path_match_formula():
    """Non-float32 parameters take the pure torch path with the same math."""
    layer = torch.nn.Linear(16, 8).double()
    model = torch.nn.Sequential(layer)
    q = diffq_c.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    before = layer.weight.detach().clone()
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
    model(torch.randn(3, 16, dtype=torch.float64)).sum().backward()
    noise = seen[0] - before
    step = (before.max() - before.min()) / (2 ** 8 - 1)
    assert seen[0].dtype == torch.float64
    assert 0 < noise.abs().max() < 3 * step  # gaussian / 2 times the step
    assert layer.weight_diffq.grad is not None and layer.weight.grad is not None


# what a gradient hook keeps of the gradient it sees
_KEEPS = {"itself": lambda g: g, "alias": lambda g: g.detach(), "view": lambda g: g.view(-1)}


def _linear_through_noise(p, logit, x, keep=None, how="itself"):
    prm = ops.BitsParam.make("bits", 2, 15)
    noisy = ops.noisy_weight(p, logit, 8, "gaussian", prm, 21)
    if keep is not None:
        noisy.register_hook(lambda g: keep.append(_KEEPS[how](g)))
    torch.nn.functional.linear(x, noisy).pow(2).sum().backward()
    return noisy


@pytest.mark.parametrize("keep_in_hook", [None, "itself", "alias", "view"])
def test_backward_updating_the_incoming_gradient_in_place_is_exact_and_invisible(keep_in_hook):
    """The backward writes the extrema correction into the incoming gradient
    when nothing else holds it (saves a weight-sized copy). The result must
    equal autograd of the formula, and a hook that kept the gradient, an
    alias of it (detach) or a view of it must still see the unmodified one
    (the alias and the view, which add no Python reference to the gradient,
    saw the correction before the storage counts were checked)."""
    gen = torch.Generator().manual_seed(5)
    p = with_ties(512 * 256, gen).view(512, 256).requires_grad_()  # in place from 65536 values
    logit = (torch.rand(512 * 256 // 8, generator=gen) * 4 - 2).requires_grad_()
    x = torch.randn(7, 256, generator=gen)
    kept = [] if keep_in_hook else None
    noisy = _linear_through_noise(p, logit, x, kept, keep_in_hook)
    p_ref = p.detach().clone().requires_grad_()
    logit_ref = logit.detach().clone().requires_grad_()
    prm = ops.BitsParam.make("bits", 2, 15)
    ref = diffq_formula(p_ref, logit_ref, 8, our_noise("gaussian", 21, p.numel()), prm)
    torch.nn.functional.linear(x, ref).pow(2).sum().backward()
    # the two noisy weights differ by a rounding, which the matmuls of the
    # upstream gradient carry: tolerances relative to the largest gradient
    scale = p_ref.grad.abs().max().item()
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(logit.grad, logit_ref.grad, rtol=1e-5, atol=1e-7 * max(1.0, scale))
    if keep_in_hook:
        upstream = 2 * torch.nn.functional.linear(x, noisy.detach()).t() @ x
        torch.testing.assert_close(kept[0].view_as(upstream), upstream, rtol=1e-5, atol=1e-5)
        assert not torch.equal(kept[0].view_as(p.grad), p.grad)  # the extrema terms are not in the kept one


def test_in_place_gradient_update_is_optional_and_exact(monkeypatch):
    """Updating the incoming gradient in place rests on a CPython reference
    count (a speed path): it is taken when nothing else holds the gradient,
    and turning it off gives bitwise the same gradients."""
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(512, 256, generator=gen).requires_grad_()
    logit = (torch.rand(512 * 256 // 8, generator=gen) * 4 - 2).requires_grad_()
    x = torch.randn(5, 256, generator=gen)
    seen = {}
    noisy = _linear_through_noise(p, logit, x)  # warm-up, nothing kept
    grads = []
    for owned in (True, False):
        if not owned:
            monkeypatch.setattr(ops, "_owned_by_autograd", lambda grad: False)
        p.grad = logit.grad = None
        prm = ops.BitsParam.make("bits", 2, 15)
        noisy = ops.noisy_weight(p, logit, 8, "gaussian", prm, 21)
        noisy.register_hook(lambda g: seen.__setitem__(owned, g.data_ptr()))
        torch.nn.functional.linear(x, noisy).pow(2).sum().backward()
        grads.append((p.grad.clone(), logit.grad.clone()))
        assert (p.grad.data_ptr() == seen[owned]) == owned
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_in_place_needs_memory_nobody_else_holds(monkeypatch):
    """_owned_by_autograd says yes to a tensor alone (and to a view whose
    base nothing else holds, as linear's weight gradient is), no where an
    alias or a view of it exists or its base is held, and no at all where
    this torch does not give the private counts it reads."""
    # (the calls outside the asserts: pytest's rewriting of an assert keeps
    # what its expression made, and that would hold the bases)
    # called directly, a tensor alone has the one use of its Python object on
    # every torch (in a backward torch 2.4's engine adds its own: the use
    # count calibrated at import is 2 there)
    monkeypatch.setattr(ops, "_FREE_GRAD_USES", 1)
    owned = ops._owned_by_autograd
    alone, viewed = owned(torch.empty(64, 64)), owned(torch.empty(64, 64).t().t())
    assert alone and viewed
    held = torch.empty(64, 64)
    alias = held.detach()
    with_alias = owned(held)
    del alias
    assert not with_alias and owned(held)
    view = held.view(-1)
    with_view = owned(held)
    del view
    base = torch.empty(64, 64)
    base_held = owned(base.t().t())  # its base is `base`, held here
    assert not with_view and not base_held
    monkeypatch.setattr(ops, "_ALONE", None)
    without_counts = owned(torch.empty(64, 64))
    assert not without_counts


def test_free_reference_count_is_measured_at_import_without_touching_torch_rng():
    """The count of references _owned_by_autograd accepts is measured at
    import through _NoisyGroup's own backward (the interpreter decides how
    many a call holds): there is one, and the measurement drew nothing from
    torch's generator. A measurement run again gives the same count, and so
    does an import under a float64 default dtype, no_grad and inference
    mode, as do the storage counts of a tensor alone (a float64 default once
    sent the measuring step down the torch path, and inference mode gave a
    view no base: either left nothing measured and nothing updated in
    place)."""
    import subprocess
    import sys
    assert ops._FREE_GRAD_REFS is not None and ops._FREE_GRAD_USES is not None and ops._REF_PROBE is None
    assert ops._calibrate_free_grad() == (ops._FREE_GRAD_REFS, ops._FREE_GRAD_USES)
    code = ("import torch; torch.manual_seed(3); import diffq_c.ops as o; "
            "print(o._FREE_GRAD_REFS, o._FREE_GRAD_USES, torch.rand(4).tolist())")
    after_import = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    refs, uses, drawn = after_import.stdout.split(" ", 2)
    assert (int(refs), int(uses)) == (ops._FREE_GRAD_REFS, ops._FREE_GRAD_USES)
    torch.manual_seed(3)
    assert drawn.strip() == str(torch.rand(4).tolist())
    # measured the same under defaults that would send a default tensor
    # elsewhere, under no_grad and in inference mode
    code = ("import torch; torch.set_default_dtype(torch.float64)\n"
            "with torch.no_grad(), torch.inference_mode():\n"
            "    import diffq_c.ops as o\n"
            "print(o._FREE_GRAD_REFS, o._FREE_GRAD_USES, o._ALONE)")
    under = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert under.stdout.strip() == f"{ops._FREE_GRAD_REFS} {ops._FREE_GRAD_USES} {ops._ALONE}"


# ------------------------------------------- the generator's specification
# A second implementation in numpy of what csrc/rng.c specifies: pcg4d of
# (counter, key) with the key from splitmix64, the tile mapping, and the
# float formulas in the same order. float32 numpy operations round like C's,
# and _fma32 rounds like fmaf, so the bits must agree.


def _fma32(a, b, c):
    """a * b + c of float32 arrays rounded once to float32, as C's fmaf.
    The product of two float32 is exact in float64; the float64 sum s and
    its error e (TwoSum) give the exact sum, from which s is rounded to odd
    (truncated, then its last bit set when inexact). Rounding that to
    float32 is then correct: float64 has more than 24 + 2 bits."""
    np = pytest.importorskip("numpy")
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    p = a * b
    s = p + c
    c_part = s - p
    e = (p - (s - c_part)) + (c - c_part)
    inexact = e != 0
    bits = s.view(np.int64) - (inexact & ((e < 0) != (s < 0))).astype(np.int64)
    return (bits | inexact.astype(np.int64)).view(np.float64).astype(np.float32)


def _fma32_exact(a, b, c):
    """The same one value at a time with exact rationals: the float32
    nearest a * b + c, ties to the even last bit."""
    np = pytest.importorskip("numpy")
    from fractions import Fraction
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    r = np.float32(float(exact))
    candidates = [r, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))]
    return min(candidates, key=lambda x: (abs(Fraction(float(x)) - exact),
                                          int(np.array(x).view(np.uint32)) & 1))


def test_fma32_rounds_once():
    """_fma32 against exact rationals: random triples, cancellations, and a
    sum just under a float32 tie that float64 rounds onto the tie (where
    the product and sum in float64 rounded to float32, twice, is wrong)."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(5)
    a = rng.standard_normal(3000).astype(np.float32)
    b = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    c = rng.standard_normal(3000).astype(np.float32)
    c[:1000] = -(a[:1000] * b[:1000])  # cancellation: the product's low bits
    c[1000:1500] = c[1000:1500] * np.float32(2.0 ** -40)  # a tiny addend
    one_tie = (np.float32(2.0 ** -12 * (1 + 2.0 ** -23)), np.float32(2.0 ** -12 * (1 - 2.0 ** -23)),
               np.float32(1 + 2.0 ** -23))
    a, b, c = np.append(a, one_tie[0]), np.append(b, one_tie[1]), np.append(c, one_tie[2])
    got = _fma32(a, b, c)
    want = np.array([_fma32_exact(x, y, z) for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    twice = (a.astype(np.float64) * b + c).astype(np.float32)
    assert got[-1] == np.float32(1 + 2.0 ** -23) and twice[-1] != got[-1]

M64 = (1 << 64) - 1


def _key(seed):
    z = (seed + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z & 0xFFFFFFFF, z >> 32


def _pcg4d(counter, seed):
    np = pytest.importorskip("numpy")
    k0, k1 = _key(seed)
    v = [(counter & 0xFFFFFFFF).astype(np.uint32), (counter >> 32).astype(np.uint32),
         np.full(counter.shape, k0, np.uint32), np.full(counter.shape, k1, np.uint32)]
    v = [x * np.uint32(1664525) + np.uint32(1013904223) for x in v]
    for round in range(2):
        v[0] = v[0] + v[1] * v[3]
        v[1] = v[1] + v[2] * v[0]
        v[2] = v[2] + v[0] * v[1]
        v[3] = v[3] + v[1] * v[2]
        if round == 0:
            v = [x ^ (x >> np.uint32(16)) for x in v]
    return v


def _gauss_table():
    """The table of csrc/noise_gen.h ([degree + 1][32] float32), read from
    the header: the table is specification data (tools/gaussian_table.py
    fits it); what this file checks independently is the formula around it
    and, below, the table's accuracy against the exact quantile."""
    np = pytest.importorskip("numpy")
    text = (Path(__file__).resolve().parent.parent / "csrc" / "noise_gen.h").read_text()
    body = text[text.index("GAUSS_POLY[GAUSS_DEGREE + 1][32] = {"):]
    body = body[body.index("{") + 1:body.index("};")]
    rows = [r for r in re.findall(r"\{([^{}]*)\}", body)]
    table = np.array([[float.fromhex(c.strip().rstrip("f")) if "0x" in c else float(c.strip().rstrip("f"))
                       for c in row.split(",") if c.strip()] for row in rows], dtype=np.float32)
    assert table.shape == (4, 32)  # degree 3: four coefficients a row
    return table


def _gauss_of_words(words):
    """N(0, 1) / 2 of 32-bit words: bits 8..30 make 4v + 2 = p * 2^26 as a
    float, its exponent's low five bits pick the table row, its mantissa m
    in [1, 2) is the point; Horner by float32 fused multiply-adds; bit 31
    the sign."""
    np = pytest.importorskip("numpy")
    f = np.float32
    table = _gauss_table()
    q = ((words >> np.uint32(6)) & np.uint32(0x1FFFFFC)) | np.uint32(2)
    bits = q.astype(f).view(np.uint32)
    row = (bits >> np.uint32(23)) & np.uint32(31)
    m = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(f)
    y = table[0][row]
    for k in range(1, len(table)):
        y = _fma32(y, m, table[k][row])
    return (y.view(np.uint32) ^ (words & np.uint32(0x80000000))).view(f)


def _spec_noise(kind, seed, start, n):
    np = pytest.importorskip("numpy")
    f = np.float32
    i = np.arange(start, start + n, dtype=np.uint64)
    # tiles of 64: element 64t + 16l + j takes word l of counter 16t + j
    counter = (i >> np.uint64(6) << np.uint64(4)) + (i & np.uint64(15))
    words = np.stack(_pcg4d(counter, seed))  # [4, n]
    word = words[((i >> np.uint64(4)) & np.uint64(3)).astype(np.int64), np.arange(n)]
    if kind == "uniform":
        return (word >> np.uint32(8)).astype(f) * f(2.0 ** -24) - f(0.5)
    return _gauss_of_words(word)


def test_gaussian_table_is_the_normal_quantile():
    """Every one of the 2^23 magnitudes against -Phi^-1(p) / 2 in float64
    (torch.special.ndtri): within 1.1e-4 (the degree-3 fit's 1.0e-4), and
    the sign bit mirrors them."""
    np = pytest.importorskip("numpy")
    v = np.arange(1 << 23, dtype=np.uint32)
    words = (v << np.uint32(8)) | np.uint32(0x5A)  # the low byte is not used
    got = _gauss_of_words(words).astype(np.float64)
    p = torch.from_numpy((2.0 * v.astype(np.float64) + 1.0) / 2.0 ** 25)
    want = (-0.5 * torch.special.ndtri(p)).numpy()
    assert np.abs(got - want).max() <= 1.1e-4
    mirrored = _gauss_of_words(words | np.uint32(0x80000000)).astype(np.float64)
    assert np.array_equal(mirrored, -got)
    # the largest magnitude is 5.42 sigma; next to p = 1/2 the fit dips
    # below zero by less than its error
    assert 2.70 < got.max() <= 2.72 and got.min() > -1.1e-4


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("seed", [0, 987654321, (1 << 64) - 1])
@pytest.mark.parametrize("start", [0, 13, (1 << 34) - 1000])
def test_reference_noise_is_the_specified_formula(kind, seed, start):
    """The C reference against the numpy implementation: the same bits over
    a few thousand elements, at odd offsets and across the counter's 32-bit
    wrap (element 2^34 is counter 2^32)."""
    n = 3001
    ref = torch.empty(n)
    _C.noise_fill(ref, KINDS[kind], seed, start, 1, reference=True)
    want = torch.from_numpy(_spec_noise(kind, seed, start, n))
    assert torch.equal(ref, want), (ref - want).abs().max()
