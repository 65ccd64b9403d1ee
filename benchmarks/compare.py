"""diffq 0.2.4 vs diffq_c, side by side in one run.

Runs of the two are interleaved and each figure is the median of several
repeats, so the ratios hold on a shared, noisy machine. Peak memory is
measured in a fresh process per case, with glibc returning freed memory at
once so that the resident set is live memory (LIVE_MEMORY_MALLOC).

    python benchmarks/compare.py                      # Linear(4096, 4096), group_size 1 and 8
    python benchmarks/compare.py --models linear lstm transformer --group-sizes 1 8 0
    python benchmarks/compare.py --memory             # adds peak memory per training step
    python benchmarks/compare.py --models many conv --group-sizes 8 1 --compile
                                                      # many small tensors, demucs-like convs,
                                                      # and the step of both under torch.compile

Each row also gives the time per quantized parameter (us/qparam): on
models of many small tensors that fixed cost is what matters. Each
speed-up comes with a 90% bootstrap interval over the rounds (see
ratio_interval), and each case ends with diffq_c's noise forward over a
clone of the parameters, the issue's other target, and over a copy into
kept memory (see time_case), with their intervals. An interval covers the
noise within a run, not the drift from run to run (10% and more on this
shared machine): it says whether a figure near a target is above or below
it in that run.
"""
import argparse
import copy
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

import diffq
import diffq_c


# ---------------------------------------------------------------- models


class ManyLinear(torch.nn.Sequential):
    """100 Linear(16, 16): 200 small quantized parameters, no per-value work
    to speak of (the fixed cost per parameter alone)."""

    def __init__(self, depth=100, width=16):
        super().__init__(*[torch.nn.Linear(width, width) for _ in range(depth)])


class DemucsLike(torch.nn.Module):
    """The widths of a demucs encoder/decoder (channels 48 to 768, kernel 8,
    stride 4, 1x1 convolutions with GLU): tensors from 768 to 4.7M values."""

    def __init__(self, channels=2, width=48, depth=5):
        super().__init__()
        self.encoder, self.decoder = torch.nn.ModuleList(), torch.nn.ModuleList()
        chin = channels
        for index in range(depth):
            chout = width * 2 ** index
            self.encoder.append(torch.nn.Sequential(
                torch.nn.Conv1d(chin, chout, 8, 4), torch.nn.ReLU(),
                torch.nn.Conv1d(chout, 2 * chout, 1), torch.nn.GLU(1)))
            self.decoder.insert(0, torch.nn.Sequential(
                torch.nn.Conv1d(chout, 2 * chout, 1), torch.nn.GLU(1),
                torch.nn.ConvTranspose1d(chout, chin, 8, 4), torch.nn.ReLU() if index else torch.nn.Identity()))
            chin = chout

    def forward(self, x):
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        for layer in self.decoder:
            x = layer(x + skips.pop()[..., :x.shape[-1]])
        return x


# min_size per model: the defaults' 0.01 MB would leave every tensor of
# ManyLinear unquantized
MIN_SIZE = {"many": 0.0}


def make_model(name):
    if name == "many":
        return ManyLinear(), lambda: torch.randn(8, 16)
    if name == "conv":
        return DemucsLike(), lambda: torch.randn(1, 2, 4 * 4 ** 5 * 4)
    if name == "linear":
        return torch.nn.Linear(4096, 4096), lambda: torch.randn(1, 4096)
    if name == "lstm":
        return torch.nn.LSTM(1024, 1024, num_layers=2), lambda: torch.randn(4, 1, 1024)
    if name == "transformer":
        layer = torch.nn.TransformerEncoderLayer(512, 8, dim_feedforward=2048, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, num_layers=8, enable_nested_tensor=False)
        return model, lambda: torch.randn(1, 16, 512)
    raise ValueError(name)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def output_tensor(out):
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- timing


# a measurement goes on past its `repeats` rounds until this many seconds
# have passed: a step of the many model takes 10-50 ms, and ten rounds of
# it gave speed-ups from 9.2x to 11.1x in four runs of one build
MIN_SECONDS = 3.0


def interleaved(cases, repeats):
    """{name: [ms of each round]}, running the cases in turn so drifts in
    machine load hit them all alike. A case that raises gets [NaN] (diffq
    cannot restore its own group_size=0 states, for one).

    Each round runs the cases in another order, through all their orders
    (so the rounds are `repeats` rounded up to a multiple of their count,
    and more such cycles while MIN_SECONDS have not passed): a case pays
    for the memory and caches the one before it left, and on the many
    model a step right after diffq's took 2 ms more than the same step
    right before it (RESULTS.md, seventh session). In a fixed order
    diffq_c always followed diffq. FIXED_ORDER=1 restores that order."""
    samples = {name: [] for name in cases}
    for name, fn in list(cases.items()):
        try:
            fn()  # warm-up
        except Exception as exc:  # noqa: BLE001 - a failing case is a result too
            print(f"  ({name} fails: {type(exc).__name__}: {str(exc)[:80]})")
            samples[name] = [float("nan")]
            del cases[name]
    names = list(cases)
    if os.environ.get("FIXED_ORDER") == "1":
        orders = [names]
    else:
        orders = [list(order) for order in itertools.permutations(names)]
    rounds = -(-repeats // len(orders)) * len(orders)
    start = time.perf_counter()
    r = 0
    while r < rounds or r % len(orders) or time.perf_counter() - start < MIN_SECONDS:
        for name in orders[r % len(orders)]:
            t0 = time.perf_counter()
            cases[name]()
            samples[name].append((time.perf_counter() - t0) * 1000)
        r += 1
    return samples


def medians(samples):
    return {name: statistics.median(v) for name, v in samples.items()}


def differences(samples, base):
    """Each case's time minus `base`'s, round by round."""
    return {name: [a - b for a, b in zip(v, samples[base])] for name, v in samples.items() if name != base}


def overheads(samples, base):
    """Median over rounds of each case's time minus `base`'s in the same
    round: a load burst then moves both terms of a difference, not one."""
    return medians(differences(samples, base))


# the bootstrap's draws and its generator's seed: the same samples give
# the same interval
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


def ratio_interval(num, den, level=0.9, draws=BOOTSTRAP_DRAWS):
    """(low, high): the central `level` interval of median(num) / median(den)
    when the rounds are drawn again with replacement, the two lists
    together (num[i] and den[i] come from round i, and a load burst moves
    both). (nan, nan) where the lists are not paired rounds (a failed case
    has one NaN) or hold a NaN, and where a draw's median of `den` is not
    above zero: an overhead lost in the noise has no ratio."""
    n = len(num)
    if n != len(den) or n < 2 or any(x != x for x in list(num) + list(den)):
        return float("nan"), float("nan")
    rng = random.Random(BOOTSTRAP_SEED)
    ratios = []
    for _ in range(draws):
        rounds = [rng.randrange(n) for _ in range(n)]
        bottom = statistics.median([den[i] for i in rounds])
        if not bottom > 0:
            return float("nan"), float("nan")
        ratios.append(statistics.median([num[i] for i in rounds]) / bottom)
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (draws - 1))], ratios[int(round((1 - tail) * (draws - 1)))]


class Setup:
    """A model with a quantizer of one library and an Adam optimizer."""

    def __init__(self, lib, model_name, group_size, base_model=None):
        self.model, self.make_input = make_model(model_name)
        if base_model is not None:
            self.model.load_state_dict(base_model.state_dict())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.quantizer = None
        if lib is not None:
            self.quantizer = lib.DiffQuantizer(self.model, group_size=group_size,
                                               min_size=MIN_SIZE.get(model_name, 0.01))
            self.quantizer.setup_optimizer(self.opt)
        self.x = self.make_input()
        self.compiled = None

    def qparams(self):
        return len([qp for qp in self.quantizer._qparams if qp.other is None])

    def compiled_step(self):
        self.full_step(compiled=True)

    def full_step(self, compiled=False):
        """A user's step: loss + penalty * model_size(), backward, Adam; with
        `compiled`, through torch.compile(model)."""
        if compiled and self.compiled is None:
            self.compiled = torch.compile(self.model)
        self.model.train()
        self.opt.zero_grad()
        loss = output_tensor((self.compiled if compiled else self.model)(self.x)).sum()
        if self.quantizer is not None:
            loss = loss + 1e-3 * self.quantizer.model_size()
        loss.backward()
        self.opt.step()

    def fresh_eval_forward(self):
        # the first eval forward after weights changed (diffq_c otherwise
        # reuses the last quantized weights, see eval_forward)
        clear = getattr(self.quantizer, "clear_eval_cache", None)
        if clear is not None:
            clear()
        self.eval_forward()

    def step(self):
        self.model.train()
        self.opt.zero_grad()
        output_tensor(self.model(self.x)).sum().backward()
        self.opt.step()

    def noise_forward(self):
        with torch.no_grad():
            self.quantizer._pre_forward_train()
            self.quantizer._post_forward_train()

    def eval_forward(self):
        self.model.eval()
        with torch.no_grad():
            self.model(self.x)
        self.model.train()

    def model_size(self):
        # as in training, where zero_grad() leaves no gradient to add to
        for qparam in self.quantizer._qparams:
            qparam.logit.grad = None
        self.quantizer.model_size().backward()

    def get_state(self):
        return self.quantizer.get_quantized_state(packed=True)


def _row(samples, base=None):
    """(diffq's figure, diffq_c's, the 90% interval of diffq / diffq_c) of
    interleaved samples: medians of the times, or with `base` of the
    differences to base's times in the same rounds."""
    values = samples if base is None else differences(samples, base)
    return (statistics.median(values["diffq"]), statistics.median(values["diffq_c"]),
            ratio_interval(values["diffq"], values["diffq_c"]))


def time_case(model_name, group_size, repeats, compile_step=False):
    """(rows, plain step ms, parameters, the largest one's values, quantized
    parameters, {"clone", "copy"}: diffq_c's noise forward over each with
    its interval). "clone" is torch's clone of the parameters, "copy" the
    same values copied into memory kept from call to call: a clone of a
    large tensor faults in fresh pages on some calls and not on others,
    depending on the allocator's history (7 or 24 ms for the Linear's
    64 MiB weight in one process), while diffq_c's noise forward writes
    into kept memory (scratch.py). The copy is the stricter measure."""
    torch.manual_seed(0)
    plain = Setup(None, model_name, group_size)
    theirs = Setup(diffq, model_name, group_size, plain.model)
    ours = Setup(diffq_c, model_name, group_size, plain.model)
    weight = max((p for p in plain.model.parameters()), key=lambda p: p.numel())
    state_theirs, state_ours = theirs.get_state(), ours.get_state()
    rows = {}
    # twice the repeats: an overhead is a difference of two noisy times
    steps = interleaved({"plain": plain.step, "diffq": theirs.step, "diffq_c": ours.step}, 2 * repeats)
    rows["train step overhead"] = _row(steps, "plain")
    full = interleaved({"plain": plain.full_step, "diffq": theirs.full_step, "diffq_c": ours.full_step},
                       2 * repeats)
    rows["step with model_size, over"] = _row(full, "plain")
    if compile_step:
        compiled = interleaved({"plain": plain.compiled_step, "diffq": theirs.compiled_step,
                                "diffq_c": ours.compiled_step}, 2 * repeats)
        rows["compiled step, over"] = _row(compiled, "plain")
    params = [p.detach() for p in plain.model.parameters()]
    kept = [torch.empty_like(p) for p in params]
    noise = interleaved({"diffq": theirs.noise_forward, "diffq_c": ours.noise_forward,
                         "clone": lambda: [p.clone() for p in params],
                         "copy": lambda: [k.copy_(p) for k, p in zip(kept, params)]}, repeats)
    rows["noise forward"] = _row(noise)
    middle = medians(noise)
    for name, what in (("clone", "  (clone of all params)"), ("copy", "  (copy into kept memory)")):
        rows[what] = (middle[name], middle[name], None)
    over_baselines = {name: (middle["diffq_c"] / middle[name], ratio_interval(noise["diffq_c"], noise[name]))
                      for name in ("clone", "copy")}
    evals = interleaved({"plain": plain.eval_forward, "diffq": theirs.eval_forward,
                         "diffq_c": ours.eval_forward}, 2 * repeats)
    rows["eval forward"] = _row(evals)
    rows["  (over plain eval)"] = _row(evals, "plain")
    fresh = interleaved({"plain": plain.eval_forward, "diffq": theirs.fresh_eval_forward,
                         "diffq_c": ours.fresh_eval_forward}, 2 * repeats)
    rows["eval after a change, over"] = _row(fresh, "plain")
    rows["model_size fwd+bwd"] = _row(interleaved({"diffq": theirs.model_size, "diffq_c": ours.model_size},
                                                  repeats))
    rows["get_quantized_state"] = _row(interleaved({"diffq": theirs.get_state, "diffq_c": ours.get_state},
                                                   repeats))
    rows["restore_quantized_state"] = _row(interleaved({
        "diffq": lambda: theirs.quantizer.restore_quantized_state(state_theirs),
        "diffq_c": lambda: ours.quantizer.restore_quantized_state(state_ours)}, repeats))
    return (rows, medians(steps)["plain"], count_params(plain.model), weight.numel(), ours.qparams(),
            over_baselines)


# ---------------------------------------------------------------- memory


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(lib_name, model_name, group_size):
    """In a fresh process: how far a training step raises the resident set
    above what it was right before (optimizer state already allocated), plus
    what the quantizer keeps between steps for its next one (diffq_c's
    reused buffers, resident before the step began)."""
    torch.manual_seed(0)
    lib = {"plain": None, "diffq": diffq, "diffq_c": diffq_c}[lib_name]
    setup = Setup(lib, model_name, group_size)
    setup.step()
    setup.opt.zero_grad(set_to_none=True)
    import gc
    gc.collect()
    # writing 5 to clear_refs resets the peak (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    setup.step()
    scratch = getattr(setup.quantizer, "_scratch", None)
    kept_kb = scratch.nbytes() // 1024 if scratch is not None else 0
    print(json.dumps({"peak_kb": _status_kb("VmHWM") - base + kept_kb}))


# glibc told to give freed memory back at once (no trim threshold, every
# allocation of 64 KiB or more its own mapping): the resident set then
# follows live memory, and a step's growth is its peak of live memory. With
# glibc's defaults it also counts what the allocator happens to keep or
# reuse, and the same case moved by up to 1.8x of the weights between runs.
LIVE_MEMORY_MALLOC = "glibc.malloc.trim_threshold=0:glibc.malloc.mmap_threshold=65536"


def peak_memory(model_name, group_size):
    out = {}
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), LIVE_MEMORY_MALLOC]))
    for lib_name in ("plain", "diffq", "diffq_c"):
        res = subprocess.run([sys.executable, __file__, "--_peak", lib_name, model_name, str(group_size)],
                             capture_output=True, text=True, check=True, env=env)
        out[lib_name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kb"] * 1024
    return out


# ---------------------------------------------------------------- report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["linear"],
                        choices=["linear", "lstm", "transformer", "many", "conv"])
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of a step")
    parser.add_argument("--_peak", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._peak:
        _peak_child(args._peak[0], args._peak[1], int(args._peak[2]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, diffq {diffq.__version__}, "
          f"diffq_c {diffq_c.__version__}")
    for model_name in args.models:
        for group_size in args.group_sizes:
            rows, plain_step, nparams, biggest, qparams, over_baselines = time_case(
                model_name, group_size, args.repeats, args.compile)
            print(f"\n## {model_name} ({nparams / 1e6:.1f}M params, {qparams} quantized), "
                  f"group_size={group_size}, plain train step {plain_step:.1f} ms")
            print(f"| {'measure':<26} | {'diffq ms':>10} | {'diffq_c ms':>10} | {'speed-up':>8} "
                  f"| {'90% interval':>13} | {'diffq us/qp':>11} | {'diffq_c us/qp':>13} |")
            print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 15}|{'-' * 13}|{'-' * 15}|")
            for name, (a, b, interval) in rows.items():
                shown = interval is not None and b > 0 and a == a
                ratio = f"{a / b:.1f}x" if shown else ""
                span = f"{interval[0]:.1f}-{interval[1]:.1f}x" if shown and interval[0] == interval[0] else ""
                print(f"| {name:<26} | {a:>10.2f} | {b:>10.2f} | {ratio:>8} | {span:>13} "
                      f"| {a * 1000 / qparams:>11.1f} | {b * 1000 / qparams:>13.1f} |")
            print("diffq_c noise forward / " + ", / ".join(
                f"{name}: {ratio:.2f} (90% interval {low:.2f}-{high:.2f})"
                for name, (ratio, (low, high)) in over_baselines.items()))
            if args.memory:
                peaks = peak_memory(model_name, group_size)
                weight_bytes = nparams * 4
                print(f"| {'extra peak memory / params':<26} | "
                      f"{(peaks['diffq'] - peaks['plain']) / weight_bytes:>9.2f}x | "
                      f"{(peaks['diffq_c'] - peaks['plain']) / weight_bytes:>9.2f}x | {'':>8} | {'':>13} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
