"""Training and eval behaviour: swapping weights, a real Adam loop, and the
quantizer's public methods."""
import copy
import subprocess
import sys
from pathlib import Path

import diffq
import pytest
import torch

import diffq_c

ROOT = Path(__file__).resolve().parents[1]


def small_net():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def test_eval_train_swapping_leaves_weights_untouched():
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0.0005, float16=True, group_size=4)
    q.no_optimizer()
    assert q._float16, "the small bias should stay float16 here"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 32)
    model.eval()
    quantized_out = model(x)
    model.train()
    model(x)
    model.eval()
    assert torch.equal(model(x), quantized_out)
    model.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_quantize_points_params_at_new_values_and_back_without_copies():
    """quantize() swaps each parameter's data for a new tensor of quantized
    values and unquantize() swaps the original back: the float weights are
    never copied nor written, and the Parameter objects stay the same."""
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0.0005, float16=True, group_size=4)
    q.no_optimizer()
    params = [p for n, p in model.named_parameters() if not n.endswith("_diffq")]
    assert len(params) == len(q._qparams) + len(q._float16) == 4
    ptrs = [p.data_ptr() for p in params]
    values = [p.detach().clone() for p in params]
    q.quantize()
    now = [p for n, p in model.named_parameters() if not n.endswith("_diffq")]
    assert all(p is p2 for p, p2 in zip(params, now))
    quantized_ptrs = [p.data_ptr() for p in params]
    assert all(a != b for a, b in zip(ptrs, quantized_ptrs)), "every swapped param gets new data"
    assert not torch.equal(model[0].weight, values[0])
    expected = q._unquantize_param(q._qparams[0], q._quantize_param(q._qparams[0]))
    q.unquantize()
    assert [p.data_ptr() for p in params] == ptrs
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    # the same values the state path gives
    q.quantize()
    assert torch.equal(model[0].weight.data.view(-1), expected.reshape(-1))
    q.unquantize()


def test_quantize_failing_midway_puts_every_param_back():
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.no_optimizer()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # the second quantized weight fails
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert not q._quantized and q._saved == []


def test_diffq_rounds_float16_params_for_good_we_do_not():
    """diffq's eval forward leaves float16 parameters rounded to half
    precision after model.train(); ours restores them."""
    model = small_net()
    twin = copy.deepcopy(model)
    ours = diffq_c.DiffQuantizer(model, min_size=0.0005, float16=True)
    theirs = diffq.DiffQuantizer(twin, min_size=0.0005, float16=True)
    x = torch.randn(5, 32)
    for m in (model, twin):
        bias_before = m[2].bias.detach().clone()
        m.eval()
        m(x)
        m.train()
        changed = not torch.equal(m[2].bias, bias_before)
        assert changed == (m is twin)
    # the eval outputs themselves agree
    model.eval()
    twin.eval()
    assert torch.equal(model(x), twin(x))


def test_adam_loop_moves_weights_and_bits():
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_c.DiffQuantizer(model, min_size=0, group_size=4)
    q.setup_optimizer(opt, lr=5e-2)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    w0 = model[0].weight.detach().clone()
    bits0 = q._get_bits(q._qparams[0].logit).mean().item()
    size0 = q.true_model_size()
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1.0 * q.model_size()
        loss.backward()
        q.check_unused()
        opt.step()
        first = first if first is not None else loss.item()
    assert not torch.equal(model[0].weight, w0)
    assert q._get_bits(q._qparams[0].logit).mean().item() < bits0 - 0.5
    assert q.true_model_size() < size0
    assert loss.item() < first


def test_training_needs_setup_optimizer():
    model = small_net()
    diffq_c.DiffQuantizer(model, min_size=0)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        model(torch.randn(2, 32))


def test_setup_and_clear_optimizer_groups():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(opt, lr=1e-3, momentum=0.5)
    group = opt.param_groups[-1]
    assert group["weight_decay"] == 0 and group["lr"] == 1e-3 and group["momentum"] == 0.5
    assert len(group["params"]) == len(q._qparams)
    with pytest.raises(RuntimeError):
        q.setup_optimizer(opt)
    q.clear_optimizer(opt)
    assert all(not any(p is qp.logit for qp in q._qparams) for g in opt.param_groups for p in g["params"])


def _logit_step(opt_kwargs, setup_kwargs, logits_grad):
    """The logits after one optimizer step from fixed gradients, and their group."""
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), **opt_kwargs)
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(opt, lr=1e-2, **setup_kwargs)
    for qp, g in zip(q._qparams, logits_grad):
        qp.logit.grad = g.clone()
    opt.step()
    return [qp.logit.detach().clone() for qp in q._qparams], opt.param_groups[-1]


def test_logits_step_with_fused_adam_same_rule_as_default_adam():
    """The logit group takes torch's fused Adam (one pass instead of ~7; the
    logits are as many as the weights at group_size=1); the update is Adam's,
    equal to the default implementation up to rounding."""
    shapes = [qp.logit.shape for qp in diffq_c.DiffQuantizer(small_net(), min_size=0)._qparams]
    grads = [torch.randn(s) for s in shapes]
    fused, group = _logit_step({}, {}, grads)
    assert group["fused"] is True and group["foreach"] is False
    plain, group = _logit_step({}, {"fused": False}, grads)
    assert group["fused"] is False
    for a, b in zip(fused, plain):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the user's foreach choice wins over our fused default
    _, group = _logit_step({}, {"foreach": True}, grads)
    assert group.get("fused") is not True and group["foreach"] is True
    # a differentiable optimizer is never fused (torch refuses the pair)
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), differentiable=True)
    diffq_c.DiffQuantizer(model, min_size=0).setup_optimizer(opt)
    assert opt.param_groups[-1].get("fused") is not True


def test_fused_logits_only_for_plain_adam():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(opt)
    assert opt.param_groups[-1].get("fused") is not True

    class MyAdam(torch.optim.Adam):
        pass

    model = small_net()
    opt = MyAdam(model.parameters())
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(opt)
    assert opt.param_groups[-1].get("fused") is not True
    assert opt.param_groups[0].get("fused") is not True  # the user's group is untouched


def test_optimizer_built_after_quantizer_is_refused():
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(RuntimeError, match="before the quantizer"):
        q.setup_optimizer(opt)


def test_check_unused_zeroes_logit_grads_of_unused_params():
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0)
    q.no_optimizer()
    q.model_size().backward()
    assert all(qp.logit.grad is not None and qp.logit.grad.abs().sum() > 0 for qp in q._qparams)
    q.check_unused()
    assert all(qp.logit.grad.abs().sum() == 0 for qp in q._qparams)


def test_quantize_unquantize_and_enter_quantize():
    model = small_net()
    q = diffq_c.DiffQuantizer(model, min_size=0, group_size=4)
    before = model[0].weight.detach().clone()
    with q.enter_quantize():
        quantized = model[0].weight.detach().clone()
        assert not torch.equal(quantized, before)
        assert quantized.unique().numel() <= 2 ** 15
    assert torch.equal(model[0].weight, before)
    assert q.quantize() is True and q.quantize() is False
    q.unquantize()
    assert torch.equal(model[0].weight, before)


def test_size_methods_agree_with_diffq():
    model = small_net()
    twin = copy.deepcopy(model)
    ours = diffq_c.DiffQuantizer(model, min_size=0, group_size=4)
    theirs = diffq.DiffQuantizer(twin, min_size=0, group_size=4)
    assert ours.true_model_size() == theirs.true_model_size()
    assert abs(ours.packed_model_size() - theirs.packed_model_size()) < 2e-3
    assert abs(ours.compressed_model_size() - theirs.compressed_model_size()) < 2e-3


def test_lstm_trains_and_evaluates():
    torch.manual_seed(0)
    model = torch.nn.LSTM(8, 16, num_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_c.DiffQuantizer(model, min_size=0, group_size=4)
    q.setup_optimizer(opt)
    x = torch.randn(5, 3, 8)
    weights = [p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_diffq")]
    out, _ = model(x)
    out.pow(2).mean().backward()
    opt.step()
    model.eval()
    eval_out, _ = model(x)
    assert torch.isfinite(eval_out).all()
    model.train()
    after = [p for n, p in model.named_parameters() if not n.endswith("_diffq")]
    assert any(not torch.equal(a, b) for a, b in zip(weights, after))


def test_extension_does_not_link_libtorch():
    from diffq_c import _C
    out = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in out.splitlines() if "NEEDED" in line]
    assert needed, out
    assert not any("torch" in line or "c10" in line for line in needed), needed


def test_extension_imports_without_torch():
    """The compiled module stands alone: loading it needs no torch, only an
    OpenMP runtime in the process (on Linux it links none and binds to the
    one torch brings, diffq_c/_openmp.py; here the system's stands in)."""
    from diffq_c import _C
    code = (
        "import ctypes, ctypes.util, importlib.util, os, sys\n"
        "if sys.platform.startswith('linux'):\n"
        "    ctypes.CDLL(ctypes.util.find_library('gomp'), mode=os.RTLD_GLOBAL)\n"
        "sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('_C', {_C.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.philox4x32_10((0, 0, 0, 0), (0, 0))[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(0x6627e8d5)


def test_c_kernel_tests_pass():
    """The C-level tests (fast kernels against their references, known
    answers, thread invariance), built and run without Python."""
    out = subprocess.run(["make", "-s", "-C", str(ROOT / "csrc"), "test"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_trains_where_diffq_fails(dtype):
    """A float16 or bfloat16 model: diffq's noisy weight comes out float32
    and the model's matmul refuses it; ours is the same float32 formula
    rounded to the parameter's dtype, and the logits still get the
    float32 formula's gradient."""
    torch.manual_seed(0)
    model = small_net().to(dtype)
    twin = copy.deepcopy(model)
    x = torch.randn(5, 32).to(dtype)
    theirs = diffq.DiffQuantizer(twin, min_size=0, group_size=4)
    theirs.no_optimizer()
    with pytest.raises(RuntimeError, match="dtype"):
        twin(x)

    q = diffq_c.DiffQuantizer(model, min_size=0, group_size=4)
    q.no_optimizer()
    weight, logit = model[0].weight, q._qparams[0].logit
    seen = {}
    model[0].register_forward_pre_hook(lambda module, args: seen.update(noisy=module.weight))
    # the same draw as the float32 formula on the float32 values
    generator_state = torch.get_rng_state()
    out = model(x)
    assert out.dtype == dtype and seen["noisy"].dtype == dtype
    torch.set_rng_state(generator_state)
    reference_logit = logit.detach().clone().requires_grad_()
    reference_weight = weight.detach().float().requires_grad_()
    reference = diffq_c.ops._noisy_weight_torch(reference_weight, reference_logit, 4, q.noise,
                                                q._bits_param)
    assert torch.equal(seen["noisy"], reference.to(dtype))
    # the noise is still there after the rounding, at the step's size
    assert not torch.equal(seen["noisy"], weight)
    seen["noisy"].float().sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(logit.grad, reference_logit.grad)
    # ones but at the range's extrema (ties, frequent in bfloat16, share their term)
    assert weight.grad.dtype == dtype and torch.equal(weight.grad, reference_weight.grad.to(dtype))
    assert (weight.grad != 1).sum() >= 2


def test_sparse_embedding_gradient_trains_where_diffq_fails():
    """nn.Embedding(sparse=True) hands its weight a sparse gradient: diffq
    cannot reshape it; ours takes its dense form (the weight's gradient is
    then dense, since the range's extrema get a term of their own), the
    same as the dense embedding's."""
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(50, 8, sparse=True)
    dense = torch.nn.Embedding(50, 8)
    dense.load_state_dict(sparse.state_dict())
    twin = copy.deepcopy(sparse)
    theirs = diffq.DiffQuantizer(twin, min_size=0, group_size=8)
    theirs.no_optimizer()
    index = torch.tensor([3, 7, 7, 41])
    with pytest.raises(RuntimeError, match="sparse"):
        twin(index).sum().backward()
    grads = []
    for model in (sparse, dense):
        q = diffq_c.DiffQuantizer(model, min_size=0, group_size=8)
        q.no_optimizer()
        torch.manual_seed(1)
        (model(index) ** 2).sum().backward()
        grads.append((model.weight.grad, q._qparams[0].logit.grad))
    (sparse_weight, sparse_logit), (dense_weight, dense_logit) = grads
    assert sparse_weight.layout == torch.strided
    assert torch.equal(sparse_weight, dense_weight) and torch.equal(sparse_logit, dense_logit)
    assert sparse_logit.abs().sum() > 0
