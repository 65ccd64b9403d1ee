"""benchmarks/per_tensor_floor.py's FloorQuantizer must do the work it
claims to stand for and nothing more: the plain model's numbers, every logit
a gradient and an optimizer step, the weights back in place after each
forward."""
import torch

from conftest import load_benchmark


def test_floor_quantizer_is_the_plain_step_plus_per_tensor_work():
    floor_mod = load_benchmark("per_tensor_floor")
    compare = floor_mod.compare
    torch.manual_seed(0)
    plain = compare.Setup(None, "many", 8)
    floor = floor_mod._Floor("many", 8, plain.model)
    floor.x = plain.x
    weights = [p for p in floor.model.parameters() if not any(p is l for l in floor.quantizer.logits)]
    assert len(floor.quantizer.logits) == len(weights) == 200
    logits_before = [l.detach().clone() for l in floor.quantizer.logits]
    for setup in (plain, floor):
        setup.model.train()
        setup.opt.zero_grad()
        compare.output_tensor(setup.model(setup.x)).sum().backward()
    # the forward saw the weights themselves: the same gradients as the plain model
    for p, q in zip(plain.model.parameters(), weights):
        assert torch.equal(p.grad, q.grad)
    assert all(l.grad is not None and l.grad.shape == l.shape for l in floor.quantizer.logits)
    # the real parameters are back in their modules after the forward
    for module, name, param, _ in floor.quantizer.sites:
        assert module._parameters[name] is param
    assert all(l.grad.abs().sum() == 0 for l in floor.quantizer.logits)
    # Adam's step over zero gradients (and no weight decay in the group)
    # leaves the logits where they were: the work is done, the values kept
    floor.opt.step()
    assert all(torch.equal(a, l) for a, l in zip(logits_before, floor.quantizer.logits))
    # the fresh floor hands the weights zero gradients of their shapes instead
    fresh = floor_mod._Floor("many", 8, plain.model, fresh_grads=True)
    fresh.x = plain.x
    fresh.step()
    fresh_weights = [p for p in fresh.model.parameters() if not any(p is l for l in fresh.quantizer.logits)]
    assert all(p.grad is not None and p.grad.shape == p.shape and not p.grad.any() for p in fresh_weights)
