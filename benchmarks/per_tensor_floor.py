"""The least a training step with diffq's API can cost in torch, per tensor.

On a model of many small tensors (compare.py's `many`: 200 tensors, 205 kB)
there is next to no memory traffic: a step's overhead is torch's work per
tensor, which any quantizer with diffq's API pays. Each quantized parameter
has a bit-logit tensor that is a Parameter of its module, in the user's
optimizer, with a gradient of its own; so every step has, besides the plain
model's work:

- zero_grad() over the logits too;
- a noisy weight per parameter, out of an autograd node whose inputs are the
  weights and the logits, put in the module for the forward and taken out;
- in backward, that node's gradients, and an AccumulateGrad node per logit;
- the optimizer's step over the logits (torch's fused Adam: diffq_c hands the
  logits to it; see base.py's _fused_options).

FloorQuantizer does just that and nothing else: one autograd node for all
parameters, the noisy weights a copy of the weights (one torch.cat into one
buffer, handed out a block of equal shapes at a time), the logits' gradients
zeros in views of one buffer, no noise, no size penalty. The weights'
gradients are either the incoming ones as they are ("identity": what a
quantizer whose noisy weight has the identity for derivative in p could
return), or zeros in views of one buffer ("fresh"). diffq's formula needs the
second: its derivative in p is the identity but at each tensor's extrema,
so the incoming gradient must be written into, and on small tensors proving
that nothing else holds it costs more (~2.5 us) than a fresh view (~0.7).
Either overhead is a floor for the per-tensor part of a step. The script
times the plain model, both floors, diffq_c and diffq side by side
(interleaved, medians of differences, as compare.py does) and reports each
overhead and the ratios to the fresh floor's, diffq_c's two with their 90%
bootstrap intervals over the rounds (compare.ratio_interval).

    python benchmarks/per_tensor_floor.py --models many conv --group-sizes 8 1
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

import diffq  # noqa: E402
import diffq_c  # noqa: E402


class _Blocks:
    """Tensors of fixed shapes as views of one buffer, made a block of equal
    shapes at a time (one unbind a shape: the cheapest way torch has to
    hand out many small tensors, ~0.6 us each here)."""

    def __init__(self, shapes):
        order = sorted(range(len(shapes)), key=lambda i: (shapes[i], i))
        self.blocks, start = [], 0  # (start, end, count, shape) in the buffer
        for i in order:
            if self.blocks and self.blocks[-1][3] == shapes[i]:
                a, _, count, shape = self.blocks[-1]
                self.blocks[-1] = (a, start + torch.Size(shape).numel(), count + 1, shape)
            else:
                self.blocks.append((start, start + torch.Size(shapes[i]).numel(), 1, shapes[i]))
            start += torch.Size(shapes[i]).numel()
        self.total = start
        self.order = order  # the buffer's tensors, by their index in `shapes`
        self.where = [0] * len(shapes)
        for position, i in enumerate(order):
            self.where[i] = position

    def views(self, buffer):
        made = []
        for a, b, count, shape in self.blocks:
            made.extend(buffer[a:b].view((count,) + tuple(shape)).unbind(0))
        return [made[j] for j in self.where]


class _AllNoisy(torch.autograd.Function):
    """Outputs: a copy of every weight (one torch.cat into one buffer).
    Gradients: for each weight the incoming one, or zeros in a view of one
    buffer (floor.fresh_grads); zeros for each logit (zeros rather than
    uninitialized memory, whose denormals or NaNs could slow the optimizer)."""

    @staticmethod
    def forward(ctx, floor, *tensors):
        ctx.floor = floor
        values = torch.cat(floor.flat_in_order, out=torch.empty(floor.weights.total))
        return tuple(floor.weights.views(values))

    @staticmethod
    def backward(ctx, *grads):
        floor = ctx.floor
        if floor.fresh_grads:
            grads = floor.weights.views(torch.zeros(floor.weights.total))
        return (None, *grads, *floor.logit_grads.views(torch.zeros(floor.logit_grads.total)))


class FloorQuantizer:
    """diffq's API shape at its cheapest: see the module's docstring."""

    def __init__(self, model, group_size, min_size, fresh_grads=False):
        self.fresh_grads = fresh_grads
        reference = diffq_c.DiffQuantizer(model, group_size=group_size, min_size=min_size)
        # the same parameters and logits (registered on the modules) as diffq_c's
        self.sites = [(qp.module, qp.name, qp.param, qp.logit) for qp in reference._qparams
                      if qp.other is None]
        reference.detach()  # its hooks off, its logits unregistered: register them again
        for module, name, _, logit in self.sites:
            module.register_parameter(name + reference.suffix, logit)
        self.ps = [p for _, _, p, _ in self.sites]
        self.logits = [l for _, _, _, l in self.sites]
        self.weights = _Blocks([tuple(p.shape) for p in self.ps])
        self.logit_grads = _Blocks([tuple(l.shape) for l in self.logits])
        with torch.no_grad():
            self.flat_in_order = [self.ps[i].view(-1) for i in self.weights.order]
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)
        self.model = model

    def setup_optimizer(self, opt):
        opt.add_param_group({"params": self.logits, "lr": 1e-3, "weight_decay": 0,
                             "fused": True, "foreach": False})

    def _pre(self, module, inputs):
        if not self.model.training:
            return
        noisy = _AllNoisy.apply(self, *self.ps, *self.logits)
        for (mod, name, _, _), value in zip(self.sites, noisy):
            mod._parameters[name] = value

    def _post(self, module, inputs, output):
        for mod, name, p, _ in self.sites:
            mod._parameters[name] = p


class _Floor:
    """compare.Setup's face for FloorQuantizer (what interleaved() calls)."""

    def __init__(self, model_name, group_size, base_model, fresh_grads=False):
        self.model, self.make_input = compare.make_model(model_name)
        self.model.load_state_dict(base_model.state_dict())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.quantizer = FloorQuantizer(self.model, group_size, compare.MIN_SIZE.get(model_name, 0.01),
                                        fresh_grads)
        self.quantizer.setup_optimizer(self.opt)
        self.x = self.make_input()

    step = compare.Setup.step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["many"],
                        choices=["linear", "lstm", "transformer", "many", "conv"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, diffq {diffq.__version__}, "
          f"diffq_c {diffq_c.__version__}")
    print("| model | group_size | plain step ms | identity floor over | fresh floor over | diffq_c over "
          "| diffq over | diffq_c / fresh floor | diffq / diffq_c | diffq / fresh floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for group_size in args.group_sizes:
            torch.manual_seed(0)
            plain = compare.Setup(None, model_name, group_size)
            floor = _Floor(model_name, group_size, plain.model)
            fresh = _Floor(model_name, group_size, plain.model, fresh_grads=True)
            ours = compare.Setup(diffq_c, model_name, group_size, plain.model)
            theirs = compare.Setup(diffq, model_name, group_size, plain.model)
            samples = compare.interleaved({"plain": plain.step, "floor": floor.step, "fresh": fresh.step,
                                           "diffq_c": ours.step, "diffq": theirs.step}, args.repeats)
            diffs = compare.differences(samples, "plain")
            over = compare.medians(diffs)
            plain_ms = compare.medians(samples)["plain"]
            to_floor = compare.ratio_interval(diffs["diffq_c"], diffs["fresh"])
            speed_up = compare.ratio_interval(diffs["diffq"], diffs["diffq_c"])
            print(f"| {model_name} | {group_size} | {plain_ms:.2f} | {over['floor']:.2f} | {over['fresh']:.2f} | "
                  f"{over['diffq_c']:.2f} | {over['diffq']:.2f} | {over['diffq_c'] / over['fresh']:.2f} "
                  f"({to_floor[0]:.2f}-{to_floor[1]:.2f}) | {over['diffq'] / over['diffq_c']:.1f}x "
                  f"({speed_up[0]:.1f}-{speed_up[1]:.1f}x) | {over['diffq'] / over['fresh']:.1f}x |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
