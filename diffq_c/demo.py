"""Size/accuracy trade-off demo for DiffQ-style differentiable quantization.

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download) once per
size penalty, with `loss = cross_entropy + penalty * quantizer.model_size()`,
then reports test accuracy of the truly quantized model, its true size, the
compression over float32 and the number of bits the quantizer learned.

    python -m diffq_c.demo [--out DIR] [--penalties P ...] [--epochs N]
                           [--group-size G] [--seed S] [--compare-diffq]
                           [--package {diffq_c,diffq}]

Outputs, in --out (created if needed):

* ``tradeoff.png``: accuracy vs. true size, and mean bits per layer;
* ``best_quantized_state.pt``: packed quantized state of the chosen model,
  which is then reloaded into a fresh model with `restore_quantized_state`
  and must give exactly the same test predictions (exit status 1 otherwise).

The quantizer package is pluggable: every function below receives the package
module (`diffq_c`, or the original `diffq` whose API it mirrors), so the same
code trains with either. `--package` defaults to the DIFFQ_DEMO_PACKAGE
environment variable, or `diffq_c` when unset. `--compare-diffq` trains the
same runs (same data, same seeds) with the original `diffq` as a reference.

scikit-learn, tqdm and matplotlib are only needed here:
``pip install diffq_c[demo]``.
"""
import argparse
import importlib
import os
import pickle
import statistics
import sys
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PACKAGE_ENV_VAR = "DIFFQ_DEMO_PACKAGE"
DEFAULT_PACKAGE = "diffq_c"
REFERENCE_PACKAGE = "diffq"
DEFAULT_PENALTIES = [0.0, 1e-2, 1.0, 100.0]
DEFAULT_EPOCHS = 15
DEFAULT_GROUP_SIZE = 8
DEFAULT_SEED = 0
# The split never depends on --seed so that accuracies of different seeds are
# measured on the same test images.
SPLIT_SEED = 0
TEST_FRACTION = 0.25
BATCH_SIZE = 32
WEIGHTS_LR = 3e-3
# diffq's default learning rate for the bits (1e-3) needs thousands of steps
# to move the bit widths noticeably; this tiny data set only gives a few
# hundred, so the bits get a faster rate.
BITS_LR = 2e-2
# Percentage points of accuracy we are willing to give up for a smaller model
# when picking the model to save.
ACCURACY_TOLERANCE = 1.0
PLOT_NAME = "tradeoff.png"
STATE_NAME = "best_quantized_state.pt"
BYTES_PER_KB = 1024


class DemoError(RuntimeError):
    """A failure that gets a one-line message and exit status 1, no traceback."""


def _require(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise DemoError(
            f"the demo needs `{module_name}` ({error}); "
            "install the demo extras with: pip install diffq_c[demo]") from error


# What the demo uses from the package under test, besides DiffQuantizer methods.
REQUIRED_API = ("DiffQuantizer", "restore_quantized_state")


def import_quantizer_package(name: str):
    try:
        package = importlib.import_module(name)
    except ImportError as error:
        raise DemoError(f"cannot import quantizer package `{name}`: {error}") from error
    missing = [attribute for attribute in REQUIRED_API if not hasattr(package, attribute)]
    if missing:
        raise DemoError(f"quantizer package `{name}` lacks {', '.join(missing)}")
    return package


# ----------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------

@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data() -> DigitsData:
    datasets = _require("sklearn.datasets")
    model_selection = _require("sklearn.model_selection")
    digits = datasets.load_digits()
    # Pixels are integers in [0, 16]; scale to [0, 1] and add a channel axis.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = model_selection.train_test_split(
        list(range(len(labels))), test_size=TEST_FRACTION,
        random_state=SPLIT_SEED, stratify=digits.target)
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return DigitsData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class DigitsCNN(nn.Module):
    """Two conv layers and two linear layers: ~38k parameters, ~98% accuracy."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, images):
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def float32_size_kb(model: nn.Module) -> float:
    # Measured before a quantizer adds its own bit-width parameters.
    return sum(p.numel() for p in model.parameters()) * 4 / BYTES_PER_KB


def params_not_divisible_by(model: nn.Module, group_size: int) -> tp.List[str]:
    """Names of parameters the quantizer cannot split in groups of `group_size`.

    A group shares one bit width, so groups must tile the tensor exactly;
    such parameters (here only the 10-element output bias when group_size=8)
    are excluded and stay float32.
    """
    return [name for name, p in model.named_parameters() if p.numel() % group_size]


def make_quantizer(package, model: nn.Module, group_size: int):
    # min_size=0: the default (0.01 MB, i.e. 2.6k floats) would skip most
    # layers of such a small model, and there would be nothing to see.
    return package.DiffQuantizer(model, min_size=0.0, group_size=group_size,
                                 exclude=params_not_divisible_by(model, group_size))


# ----------------------------------------------------------------------------
# Training and measurements
# ----------------------------------------------------------------------------

@dataclass
class TrainedModel:
    model: nn.Module
    quantizer: tp.Any
    penalty: float
    seconds_per_epoch: float            # median over epochs
    float32_kb: float


@dataclass
class Measurement:
    penalty: float
    accuracy: float                      # percent, quantized model
    size_kb: float                       # quantizer.true_model_size()
    compression: float                   # float32 size / true size
    mean_bits: float                     # over quantized weights, by element
    seconds_per_epoch: float
    bits_per_layer: tp.Dict[str, float] = field(default_factory=dict)
    weights_per_layer: tp.Dict[str, int] = field(default_factory=dict)
    predictions: tp.Optional[torch.Tensor] = None


def train(package, data: DigitsData, penalty: float, epochs: int, group_size: int,
          seed: int, progress: bool = True) -> TrainedModel:
    tqdm = _require("tqdm").tqdm
    # One seed drives initialization, batch order and the quantizer's noise,
    # so two packages with the same API see exactly the same run.
    torch.manual_seed(seed)
    model = DigitsCNN()
    float32_kb = float32_size_kb(model)
    # The optimizer is built before the quantizer registers its bit-width
    # parameters on the model; setup_optimizer then adds those as their own
    # group (with their own learning rate and no weight decay).
    optimizer = torch.optim.Adam(model.parameters(), lr=WEIGHTS_LR)
    quantizer = make_quantizer(package, model, group_size)
    quantizer.setup_optimizer(optimizer, lr=BITS_LR)
    batch_order = torch.Generator().manual_seed(seed)

    model.train()
    epoch_seconds = []
    bar = tqdm(range(epochs), desc=f"{package.__name__} penalty={penalty:g}",
               leave=False, disable=not progress, file=sys.stderr)
    for _ in bar:
        start = time.perf_counter()
        cross_entropy = _train_one_epoch(model, quantizer, optimizer, data, penalty, batch_order)
        epoch_seconds.append(time.perf_counter() - start)
        bar.set_postfix(cross_entropy=f"{cross_entropy:.3f}",
                        size_kb=f"{quantizer.true_model_size() * BYTES_PER_KB:.1f}")
    bar.close()
    # The median shrugs off epochs slowed down by other jobs on a shared machine.
    return TrainedModel(model, quantizer, penalty, statistics.median(epoch_seconds), float32_kb)


def _train_one_epoch(model, quantizer, optimizer, data: DigitsData, penalty: float,
                     batch_order: torch.Generator) -> float:
    """Returns the mean cross-entropy (without the size penalty) of the epoch."""
    order = torch.randperm(len(data.y_train), generator=batch_order)
    total_cross_entropy = 0.0
    for batch in order.split(BATCH_SIZE):
        logits = model(data.x_train[batch])
        cross_entropy = F.cross_entropy(logits, data.y_train[batch])
        loss = cross_entropy
        if penalty:
            loss = loss + penalty * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_cross_entropy += cross_entropy.item() * len(batch)
    return total_cross_entropy / len(data.y_train)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # In eval mode a DiffQuantizer swaps in the truly quantized weights for
    # the duration of the forward, so this measures the deployable model.
    model.eval()
    return model(images).argmax(dim=1)


def accuracy_percent(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (predictions == labels).float().mean().item()


@torch.no_grad()
def learned_bits_per_layer(model: nn.Module, quantizer) -> tp.Dict[str, tp.Tuple[float, int]]:
    """{parameter name: (mean rounded bits, number of elements)}."""
    module_names = {id(module): name for name, module in model.named_modules()}
    layers = {}
    for qparam in quantizer._qparams:
        if qparam.other is not None:  # a shared parameter is stored only once
            continue
        # Rounded, because that is what the stored model actually uses.
        bits = quantizer._get_bits(qparam.logit).round()
        # Every bit width covers the same number of weights within a layer,
        # so the plain mean is the per-element mean.
        name = f"{module_names[id(qparam.module)]}.{qparam.name}"
        layers[name] = (bits.float().mean().item(), qparam.param.numel())
    return layers


def measure(trained: TrainedModel, data: DigitsData) -> Measurement:
    predictions = predict(trained.model, data.x_test)
    size_kb = trained.quantizer.true_model_size() * BYTES_PER_KB
    layers = learned_bits_per_layer(trained.model, trained.quantizer)
    n_quantized = sum(numel for _, numel in layers.values())
    mean_bits = sum(bits * numel for bits, numel in layers.values()) / max(n_quantized, 1)
    return Measurement(
        penalty=trained.penalty,
        accuracy=accuracy_percent(predictions, data.y_test),
        size_kb=size_kb,
        compression=trained.float32_kb / size_kb,
        mean_bits=mean_bits,
        seconds_per_epoch=trained.seconds_per_epoch,
        bits_per_layer={name: bits for name, (bits, _) in layers.items()},
        weights_per_layer={name: numel for name, (_, numel) in layers.items()},
        predictions=predictions)


def pick_best(measurements: tp.List[Measurement]) -> tp.Tuple[Measurement, str]:
    """Smallest model whose accuracy is within ACCURACY_TOLERANCE of the best."""
    top_accuracy = max(m.accuracy for m in measurements)
    acceptable = [m for m in measurements if m.accuracy >= top_accuracy - ACCURACY_TOLERANCE]
    best = min(acceptable, key=lambda m: m.size_kb)
    reason = (f"smallest true size ({best.size_kb:.2f} kB) among the runs within "
              f"{ACCURACY_TOLERANCE:g} point of the best accuracy ({top_accuracy:.2f}%)")
    return best, reason


# ----------------------------------------------------------------------------
# Saving, reloading, plotting, reporting
# ----------------------------------------------------------------------------

def load_state(path: Path, package) -> dict:
    if package.__name__ == REFERENCE_PACKAGE:
        # diffq stores its quantizer class in state["meta"], which torch>=2.6's
        # default weights_only=True loader refuses.
        return torch.load(path, weights_only=False)
    try:
        # explicit: before torch 2.6 the default was weights_only=False
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message is long and colored; one line says enough.
        print(f"warning: torch.load(weights_only=True) refused {path}, whose state "
              "holds Python objects; retrying with weights_only=False "
              "(only do this for files you trust).")
        return torch.load(path, weights_only=False)


def reload_and_check(package, path: Path, data: DigitsData,
                     expected: Measurement) -> tp.Tuple[bool, float]:
    """Restore the saved state into a fresh model; True if predictions match."""
    state = load_state(path, package)
    fresh_model = DigitsCNN()  # its random init must be fully overwritten
    package.restore_quantized_state(fresh_model, state)
    predictions = predict(fresh_model, data.x_test)
    accuracy = accuracy_percent(predictions, data.y_test)
    same = torch.equal(predictions, expected.predictions) and accuracy == expected.accuracy
    return same, accuracy


def save_plot(path: Path, measurements: tp.List[Measurement], package_name: str,
              group_size: int, saved: Measurement,
              reference: tp.Optional[tp.List[Measurement]] = None):
    _require("matplotlib")
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(13, 5), layout="constrained")
    tradeoff, bits_axis = figure.subplots(1, 2, width_ratios=[1, 1.15])
    _plot_tradeoff(tradeoff, measurements, package_name, saved, reference)
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    tradeoff.xaxis.set_major_formatter(plain_numbers)
    tradeoff.xaxis.set_minor_formatter(plain_numbers)
    _plot_bits_per_layer(bits_axis, measurements, group_size)
    figure.suptitle(f"{package_name}: differentiable quantization of a small CNN "
                    "on sklearn digits", fontsize=13)
    figure.savefig(path, dpi=110)


def _plot_tradeoff(axis, measurements, package_name, saved, reference):
    sizes = [m.size_kb for m in measurements]
    axis.plot(sizes, [m.accuracy for m in measurements], "-", color="tab:gray",
              label=package_name)
    # Same colour per penalty as in the bits panel, to read both together.
    for index, m in enumerate(measurements):
        axis.plot([m.size_kb], [m.accuracy], "o", color=f"C{index}", markersize=9)
    axis.plot([saved.size_kb], [saved.accuracy], "o", markersize=18, markerfacecolor="none",
              markeredgecolor="black", markeredgewidth=1.5, label="saved and reloaded")
    for m in measurements:
        axis.annotate(f"penalty={m.penalty:g}\n{m.mean_bits:.1f} bits, {m.compression:.1f}x",
                      (m.size_kb, m.accuracy), textcoords="offset points",
                      xytext=(0, -30), ha="center", fontsize=8)
    if reference:
        axis.plot([m.size_kb for m in reference], [m.accuracy for m in reference],
                  "x--", color="black", markersize=9, alpha=0.7,
                  label=f"{REFERENCE_PACKAGE} (reference)")
    axis.set_xscale("log")
    axis.set_xlim(min(sizes) / 1.35, max(sizes) * 1.35)
    lowest = min(m.accuracy for m in measurements + (reference or []))
    axis.set_ylim(min(lowest - 3, 90), 100.5)
    axis.set_xlabel("true quantized model size (kB, log scale)")
    axis.set_ylabel("test accuracy, quantized weights (%)")
    axis.set_title("Accuracy vs. size: one point per size penalty")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right")


def _plot_bits_per_layer(axis, measurements, group_size):
    layer_names = list(measurements[0].bits_per_layer)
    weights = measurements[0].weights_per_layer
    positions = list(range(len(layer_names)))
    for index, m in enumerate(measurements):
        axis.plot(positions, [m.bits_per_layer[name] for name in layer_names], "o-",
                  color=f"C{index}", label=f"penalty={m.penalty:g}")
    # The weight counts show which layers dominate the size.
    axis.set_xticks(positions, [f"{name}\n{weights[name]:,} w" for name in layer_names],
                    fontsize=8)
    axis.set_ylabel("mean learned bits (rounded)")
    axis.set_title(f"Bits per quantized parameter (group size {group_size})")
    axis.set_ylim(0, 16)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8, loc="upper right")


TABLE_COLUMNS = ["penalty", "acc (%)", "size (kB)", "compression", "mean bits", "s/epoch"]
REFERENCE_COLUMNS = ["diffq acc (%)", "diffq size (kB)", "diffq s/epoch", "speedup"]


def result_rows(measurements: tp.List[Measurement],
                reference: tp.Optional[tp.List[Measurement]]) -> tp.List[dict]:
    rows = []
    for index, m in enumerate(measurements):
        row = dict(penalty=m.penalty, accuracy=m.accuracy, size_kb=m.size_kb,
                   compression=m.compression, mean_bits=m.mean_bits,
                   seconds_per_epoch=m.seconds_per_epoch,
                   bits_per_layer=dict(m.bits_per_layer))
        if reference:
            ref = reference[index]
            row.update(reference_accuracy=ref.accuracy, reference_size_kb=ref.size_kb,
                       reference_seconds_per_epoch=ref.seconds_per_epoch,
                       speedup=ref.seconds_per_epoch / m.seconds_per_epoch)
        rows.append(row)
    return rows


def format_table(rows: tp.List[dict]) -> str:
    with_reference = bool(rows) and "reference_accuracy" in rows[0]
    header = TABLE_COLUMNS + (REFERENCE_COLUMNS if with_reference else [])
    lines = []
    for row in rows:
        cells = [f"{row['penalty']:g}", f"{row['accuracy']:.2f}", f"{row['size_kb']:.2f}",
                 f"{row['compression']:.1f}x", f"{row['mean_bits']:.2f}",
                 f"{row['seconds_per_epoch']:.3f}"]
        if with_reference:
            cells += [f"{row['reference_accuracy']:.2f}", f"{row['reference_size_kb']:.2f}",
                      f"{row['reference_seconds_per_epoch']:.3f}", f"{row['speedup']:.2f}x"]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def join(cells):
        return " | ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([join(header), rule] + [join(cells) for cells in lines])


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def train_and_measure_all(package, data, penalties, epochs, group_size, seed,
                          progress) -> tp.Tuple[tp.List[TrainedModel], tp.List[Measurement]]:
    trained, measured = [], []
    for penalty in penalties:
        trained_model = train(package, data, penalty, epochs, group_size, seed, progress)
        trained.append(trained_model)
        measured.append(measure(trained_model, data))
    return trained, measured


def run(package, out_dir, penalties=DEFAULT_PENALTIES, epochs=DEFAULT_EPOCHS,
        group_size=DEFAULT_GROUP_SIZE, seed=DEFAULT_SEED, reference_package=None,
        progress=True) -> dict:
    """Train, measure, plot, save and reload; returns everything for tests.

    `package` is the quantizer package module under test (`diffq_c` or
    `diffq`); `reference_package`, if given, is trained the same way for
    comparison only. Returns a dict with `rows` (one dict per penalty, see
    `result_rows`), `table` (printed text), `plot_path`, `state_path`,
    `best_penalty`, `best_reason`, `reload_accuracy` and `reload_ok`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    probe_model = DigitsCNN()
    float32_kb = float32_size_kb(probe_model)
    print(f"Quantizer package: {package.__name__} "
          f"({getattr(package, '__file__', '?')})")
    print(f"Data: sklearn digits, {len(data.y_train)} train / {len(data.y_test)} test images; "
          f"model: DigitsCNN, {float32_kb:.2f} kB in float32")
    print(f"Settings: {epochs} epochs, batch {BATCH_SIZE}, Adam lr {WEIGHTS_LR:g} "
          f"(bits lr {BITS_LR:g}), seed {seed}, min_size=0, group_size={group_size}")
    excluded = params_not_divisible_by(probe_model, group_size)
    if excluded:
        print(f"Kept in float32 (size not a multiple of group_size {group_size}): "
              + ", ".join(excluded))

    trained, measured = train_and_measure_all(
        package, data, penalties, epochs, group_size, seed, progress)
    reference = None
    if reference_package is not None:
        if reference_package is package:
            print(f"note: the package under test is {REFERENCE_PACKAGE} itself; "
                  "the comparison only checks reproducibility.")
        _, reference = train_and_measure_all(
            reference_package, data, penalties, epochs, group_size, seed, progress)

    rows = result_rows(measured, reference)
    table = format_table(rows)
    print()
    print(table)
    print(f"(1 kB = {BYTES_PER_KB} bytes; compression is over the {float32_kb:.2f} kB "
          "float32 model; accuracy is measured with the truly quantized weights)")

    best, reason = pick_best(measured)
    plot_path = out_dir / PLOT_NAME
    save_plot(plot_path, measured, package.__name__, group_size, best, reference)
    print(f"Plot written to {plot_path}")

    best_trained = trained[measured.index(best)]
    state_path = out_dir / STATE_NAME
    torch.save(best_trained.quantizer.get_quantized_state(), state_path)
    print(f"Chose penalty={best.penalty:g}: {reason}.")
    print(f"Packed quantized state written to {state_path} "
          f"({state_path.stat().st_size / BYTES_PER_KB:.2f} kB on disk)")

    reload_ok, reload_accuracy = reload_and_check(package, state_path, data, best)
    verdict = "OK, identical predictions" if reload_ok else "MISMATCH"
    print(f"Reload check: restore_quantized_state into a fresh model gives "
          f"{reload_accuracy:.2f}% vs {best.accuracy:.2f}% when quantized in eval: {verdict}")

    return dict(package=package.__name__, rows=rows, table=table,
                plot_path=plot_path, state_path=state_path,
                best_penalty=best.penalty, best_reason=reason,
                reload_accuracy=reload_accuracy, reload_ok=reload_ok,
                epochs=epochs, group_size=group_size, seed=seed)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffq_c.demo",
        description="Train a small CNN on sklearn digits with DiffQ for several model "
                    "size penalties and show the accuracy / size trade-off.")
    parser.add_argument("--out", default=".",
                        help="output folder for the plot and the saved state (default: .)")
    parser.add_argument("--penalties", type=float, nargs="+", default=DEFAULT_PENALTIES,
                        help="model size penalties, one training each "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help="training epochs per penalty (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="number of weights sharing one bit width "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed for init, batch order and noise (default: %(default)s)")
    parser.add_argument("--compare-diffq", action="store_true",
                        help=f"also train with the original `{REFERENCE_PACKAGE}` package, "
                             "if installed, and add its columns to the table")
    parser.add_argument("--package", choices=[DEFAULT_PACKAGE, REFERENCE_PACKAGE],
                        default=os.environ.get(PACKAGE_ENV_VAR, DEFAULT_PACKAGE),
                        help=f"quantizer package under test (default: ${PACKAGE_ENV_VAR} "
                             f"or {DEFAULT_PACKAGE})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.group_size < 1:
        # group_size=0 (one bit width per tensor) is left out: diffq 0.2.4
        # cannot restore the packed states it produces.
        parser.error("--group-size must be >= 1")
    return args


def _reference_package_or_none():
    try:
        return importlib.import_module(REFERENCE_PACKAGE)
    except ImportError:
        print(f"note: --compare-diffq ignored, `{REFERENCE_PACKAGE}` is not installed "
              f"(pip install {REFERENCE_PACKAGE}).")
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        package = import_quantizer_package(args.package)
        reference = _reference_package_or_none() if args.compare_diffq else None
        result = run(package, args.out, penalties=args.penalties, epochs=args.epochs,
                     group_size=args.group_size, seed=args.seed,
                     reference_package=reference, progress=not args.no_progress)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    if not result["reload_ok"]:
        print("error: the reloaded model does not reproduce the quantized model",
              file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
