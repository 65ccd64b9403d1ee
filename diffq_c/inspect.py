"""What a quantizer learned, read from a saved state.

    python -m diffq_c.inspect FILE [--model pkg.module:factory] [--json] [--plot out.png]

FILE is a state from `get_quantized_state()` (saved by diffq_c or by diffq,
packed or not, torch_pack or not), or a checkpoint dict holding one. It is
read with `torch.load(weights_only=True)` rules (diffq_c.load): no pickled
code runs.

States hold no parameter names and, once packed, no exact sizes: the packed
tensors are padded to whole lines, and groups at `min_bits` (stored as 0)
cannot be told from that padding. Without `--model` such counts are the
smallest the packed tensors allow (shown with "~"); `--model` builds the
model and gives names and exact counts.
"""
import argparse
import importlib
import inspect as _signature_source
import io
import json
import re
import sys
import typing as tp

import torch

from . import bitpack, torch_pack
from .diffq import DiffQuantizer
from .loading import load
from .lsq import LSQ
from .uniform import UniformQuantizer

EXPECTED = ("a quantized state from get_quantized_state() (diffq or diffq_c), "
            "or a checkpoint dict holding one")


class InspectError(Exception):
    """A file that is not what inspect reads; one line for the user."""


# ------------------------------------------------------------- finding it

def _is_state(obj: tp.Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("quantized"), (list, tuple))
            and isinstance(obj.get("meta"), dict) and "klass" in obj["meta"])


def find_state(obj: tp.Any, where: str = "") -> tp.Tuple[dict, str]:
    """The first quantized state in `obj`, breadth first, and the key path
    to it ("" for the object itself)."""
    queue = [(obj, where)]
    while queue:
        node, path = queue.pop(0)
        if _is_state(node):
            return node, path
        if isinstance(node, dict):
            queue.extend((value, f"{path}[{key!r}]") for key, value in node.items())
        elif isinstance(node, (list, tuple)):
            queue.extend((value, f"{path}[{i}]") for i, value in enumerate(node))
    raise InspectError("no quantized state in it (a dict with 'quantized' and 'meta' entries)")


# ----------------------------------------------------------- the layouts

def _settings(state: dict) -> tp.Tuple[type, dict]:
    """The quantizer class and its arguments, defaults filled in."""
    meta = state["meta"]
    klass = meta["klass"]
    for ours in (DiffQuantizer, UniformQuantizer, LSQ):
        if isinstance(klass, type) and issubclass(klass, ours):
            kwargs = {name: p.default for name, p in
                      _signature_source.signature(ours.__init__).parameters.items()
                      if p.default is not p.empty}
            kwargs.update(meta.get("init_kwargs") or {})
            return ours, kwargs
    raise InspectError(f"meta names {klass!r}, not a DiffQuantizer, UniformQuantizer or LSQ")


class _Packed:
    """Capacity arithmetic of one packing layout: values are padded to whole
    units (bitpack: lines of 64 * block values; torch_pack: the bits of a
    storage word)."""

    def __init__(self, use_torch_pack: bool):
        self.torch_pack = use_torch_pack

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.torch_pack:
            return torch_pack.unpack(packed)
        return bitpack.unpack(packed)

    def unit(self, packed: torch.Tensor) -> int:
        if self.torch_pack:
            return torch.iinfo(packed.dtype).bits
        return 64 * packed.shape[2]

    def capacity(self, packed: tp.Optional[torch.Tensor]) -> int:
        if packed is None:
            return 0
        if not isinstance(packed, torch.Tensor) or packed.dim() != (2 if self.torch_pack else 3):
            raise InspectError(f"a packed entry is {_describe(packed)}, not a packed tensor")
        return packed.shape[1] * self.unit(packed) if self.torch_pack \
            else packed.shape[0] * self.unit(packed)

    def fits(self, packed: tp.Optional[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
        """Whether packing `count` values gives `packed`'s size (vectorized)."""
        if packed is None:
            return count == 0
        unit = self.unit(packed)
        return (count + unit - 1) // unit * unit == self.capacity(packed)

    def least(self, packed: torch.Tensor) -> int:
        """The fewest values `packed` can hold: its last non-zero value fixes
        a lower bound, and so does the padding being less than one unit."""
        values = self.unpack(packed)
        nonzero = torch.nonzero(values).flatten()
        last = int(nonzero[-1]) + 1 if nonzero.numel() else 0
        return max(last, self.capacity(packed) - self.unit(packed) + 1, 1)


def _describe(x: tp.Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _stored_bytes(x: tp.Any) -> int:
    """Bytes of the tensors and numbers of an entry as saved (a Python float
    is pickled as 8 bytes)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_stored_bytes(y) for y in x)
    if isinstance(x, (int, float)):
        return 8
    return 0


def _bits_row(bits: torch.Tensor) -> dict:
    bits = bits.to(torch.float64)
    return {"mean_bits": float(bits.mean()), "min_bits": float(bits.min()),
            "max_bits": float(bits.max())}


def _diffq_entry(entry: tp.Any, kwargs: dict, packed: tp.Optional[_Packed],
                 numel: tp.Optional[int]) -> dict:
    """values, group size and the bits of every group of one DiffQuantizer
    entry: (levels, (min, max), bits), their packed forms when `packed`."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise InspectError(f"a DiffQuantizer entry is {_describe(entry)}, "
                           "expected (levels, (min, max), bits)")
    levels, _, bits = entry
    if packed is None:
        if not isinstance(levels, torch.Tensor) or levels.dim() != 2 \
                or not isinstance(bits, torch.Tensor) or bits.numel() != levels.shape[0]:
            raise InspectError(f"a DiffQuantizer entry holds {_describe(levels)} and {_describe(bits)}, "
                               "expected levels [groups, group_size] and bits [groups]")
        return {"values": levels.numel(), "exact": True, "group_size": levels.shape[1],
                "group_bits": bits.flatten().to(torch.int64)}
    if not isinstance(levels, (list, tuple)) or len(levels) > 15:
        raise InspectError(f"packed levels are {_describe(levels)}, expected a list per bit width")
    min_bits = int(kwargs["min_bits"])
    group_size = int(kwargs["group_size"])
    stored = packed.unpack(bits).to(torch.int64)
    by_width = list(levels) + [None] * (15 - len(levels))
    if group_size == 0:
        # one group: its bits are the first stored value, its size what its width holds
        width = int(stored[0]) + min_bits
        if not 1 <= width <= 15 or by_width[width - 1] is None:
            raise InspectError(f"packed bits say {width} bits, and there are no levels of that width")
        span = numel if numel is not None else packed.least(by_width[width - 1])
        return {"values": span, "exact": numel is not None, "group_size": span,
                "group_bits": torch.tensor([width])}
    if numel is not None:
        groups = numel // group_size
    else:
        # every count from the last non-zero stored value to the capacity is
        # possible; keep the smallest that all the level tensors agree with
        nonzero = torch.nonzero(stored).flatten()
        first = max(int(nonzero[-1]) + 1 if nonzero.numel() else 0, 1)
        candidates = torch.arange(first, stored.numel() + 1)
        base = torch.bincount(stored[:first], minlength=16)
        ok = torch.ones_like(candidates, dtype=torch.bool)
        # widths past the list's end are not checked: diffq 0.2.4 stores
        # widths 1..14 only and drops the levels of 15-bit groups
        for width in range(min_bits, len(levels) + 1):
            offset = width - min_bits
            count = base[offset] + (candidates - first if offset == 0 else 0)
            ok &= packed.fits(by_width[width - 1], count * group_size)
        if not bool(ok.any()):
            raise InspectError("packed levels and packed bits disagree on the number of groups")
        fitting = candidates[ok]
        groups = int(fitting[0])
        exact = fitting.numel() == 1
    return {"values": groups * group_size, "exact": numel is not None or exact,
            "group_size": group_size, "group_bits": stored[:groups] + min_bits}


def _fixed_bits_entry(entry: tp.Any, bits: float, packed: tp.Optional[_Packed],
                      numel: tp.Optional[int], what: str) -> dict:
    """UniformQuantizer (levels, (min, max)) or LSQ (levels, scale): one
    range or scale per tensor, every value on the same bits."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 \
            or not isinstance(entry[0], torch.Tensor):
        raise InspectError(f"a {what} entry is {_describe(entry)}, expected (levels, {what} scale)")
    levels = entry[0]
    if packed is None:
        values, exact = levels.numel(), True
    elif numel is not None:
        values, exact = numel, True
    else:
        values = packed.least(levels)
        exact = values == packed.capacity(levels)
    return {"values": values, "exact": exact, "group_size": values,
            "group_bits": torch.tensor([float(bits)])}


# ---------------------------------------------------------------- report

def _model_params(spec: str, klass: type, kwargs: dict) -> tp.List[tp.Tuple[str, int]]:
    """(name, numel) of each quantized parameter, in the state's order, from
    the model `pkg.module:factory` builds."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InspectError(f"--model {spec!r}: expected pkg.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory()
    except Exception as exc:  # the user's code: report, do not trace back
        raise InspectError(f"--model {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise InspectError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    build = {k: v for k, v in kwargs.items() if k not in klass._STATE_EXCLUDED_KWARGS}
    quantizer = klass(model, **build)
    return [(quantizer._param_name(qp), qp.param.numel()) for qp in quantizer._unique_qparams()]


def _kept(tensors: tp.Any) -> dict:
    tensors = [t for t in (tensors or []) if isinstance(t, torch.Tensor)]
    return {"tensors": len(tensors), "values": sum(t.numel() for t in tensors),
            "bytes": sum(_stored_bytes(t) for t in tensors)}


def summarize(state: dict, names: tp.Optional[tp.Sequence[str]] = None,
              numels: tp.Optional[tp.Sequence[int]] = None) -> tp.Tuple[dict, tp.List[torch.Tensor]]:
    """The report of a state, as plain data, and each entry's group bits."""
    klass, kwargs = _settings(state)
    meta = state["meta"]
    quantized = state["quantized"]
    if numels is not None and len(numels) != len(quantized):
        raise InspectError(f"the state has {len(quantized)} quantized entries, "
                           f"the model's quantizer {len(numels)}: another model?")
    packed = _Packed(bool(meta.get("torch_pack", False))) if meta.get("packed", False) else None
    entries, all_bits = [], []
    for index, entry in enumerate(quantized):
        numel = numels[index] if numels is not None else None
        if klass is DiffQuantizer:
            row = _diffq_entry(entry, kwargs, packed, numel)
        else:
            row = _fixed_bits_entry(entry, kwargs["bits"], packed, numel, klass.__name__)
        group_bits = row.pop("group_bits")
        all_bits.append(group_bits)
        entries.append({"index": index, "name": names[index] if names else None, **row,
                        **_bits_row(group_bits), "bytes": _stored_bytes(entry)})
    float16, others = _kept(state.get("float16")), _kept(state.get("others"))
    values = sum(e["values"] for e in entries)
    stored = sum(e["bytes"] for e in entries) + float16["bytes"] + others["bytes"]
    float32 = 4 * (values + float16["values"] + others["values"])
    report = {
        "quantizer": klass.__name__,
        "packed": bool(meta.get("packed", False)),
        "torch_pack": bool(meta.get("torch_pack", False)),
        "init_kwargs": {k: v for k, v in (meta.get("init_kwargs") or {}).items()
                        if isinstance(v, (int, float, str, bool, list, type(None)))},
        "entries": entries,
        "float16": float16,
        "others": others,
        "totals": {"quantized_values": values, "exact": all(e["exact"] for e in entries),
                   "stored_bytes": stored, "float32_bytes": float32,
                   "compression": float32 / stored if stored else None},
    }
    return report, all_bits


def _bytes_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)  # unreachable: the loop returns at "GB"


def format_text(report: dict, file: str, where: str) -> str:
    lines = [f"{file}: {report['quantizer']} state"
             + (f" at {where}" if where else "")
             + (", packed" + (" (torch_pack)" if report["torch_pack"] else "") if report["packed"]
                else ", not packed"),
             f"settings: {report['init_kwargs']}", ""]
    header = ["#", "name", "values", "group", "mean bits", "min", "max", "bytes"]
    rows = [[str(e["index"]), e["name"] or "-", ("" if e["exact"] else "~") + str(e["values"]),
             ("" if e["exact"] else "~") + str(e["group_size"]), f"{e['mean_bits']:.2f}",
             f"{e['min_bits']:g}", f"{e['max_bits']:g}", str(e["bytes"])] for e in report["entries"]]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        lines.append("  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    totals = report["totals"]
    kept = [f"{report[k]['tensors']} {k} ({report[k]['values']} values, {report[k]['bytes']} bytes)"
            for k in ("float16", "others")]
    lines += ["", "kept aside: " + ", ".join(kept),
              f"total: {'~' if not totals['exact'] else ''}{_bytes_text(totals['stored_bytes'])} stored, "
              f"{_bytes_text(totals['float32_bytes'])} as float32, "
              + (f"compression {totals['compression']:.2f}x" if totals["compression"] else "nothing stored")]
    if not totals["exact"]:
        lines.append("~: the packed state does not fix this count (trailing zeros look like padding, "
                     "and so do groups at min_bits); the smallest possible is shown, --model gives "
                     "the exact one")
    return "\n".join(lines)


def plot(report: dict, group_bits: tp.List[torch.Tensor], out: str) -> None:
    """Mean bits per entry (bars from min to max) and a histogram of the
    bits of all groups."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InspectError(f"--plot needs matplotlib (pip install 'diffq_c[demo]'): {exc}") from exc
    entries = report["entries"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(entries)))
    means = [e["mean_bits"] for e in entries]
    left.bar(xs, means, color="tab:blue")
    left.errorbar(xs, means, yerr=[[m - e["min_bits"] for m, e in zip(means, entries)],
                                   [e["max_bits"] - m for m, e in zip(means, entries)]],
                  fmt="none", ecolor="black", capsize=2)
    left.set_xticks(xs)
    left.set_xticklabels([e["name"] or str(e["index"]) for e in entries], rotation=90, fontsize=7)
    left.set_ylabel("bits (mean; min to max)")
    left.set_title("bits per quantized entry")
    flat = torch.cat([b.to(torch.float64).flatten() for b in group_bits]) if group_bits \
        else torch.zeros(0)
    edges = [b - 0.5 for b in range(1, 17)]
    right.hist(flat.numpy() if flat.numel() else [], bins=edges, color="tab:orange")
    right.set_xlabel("bits of a group")
    right.set_ylabel("groups")
    right.set_title("group bits, all entries")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


# ------------------------------------------------------------------- CLI

def _read(file: str) -> tp.Any:
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InspectError(exc.strerror or str(exc)) from exc
    try:
        return load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch.load raises many kinds for a foreign file
        raise InspectError(f"cannot be read with weights_only=True ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    """One line from torch.load's error: its weights-only refusal is a long
    text whose useful part follows "WeightsUnpickler error:"."""
    text = str(exc).strip()
    refused = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if refused:
        text = refused.group(1)
    line = text.splitlines()[0] if text else ""
    line = line.split(" was not an allowed global")[0]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _names_in(state: dict, count: int) -> tp.Optional[tp.List[str]]:
    """Names saved beside the state (a 'names' list of strings, one per
    quantized entry), when the file has them."""
    names = state.get("names")
    if isinstance(names, (list, tuple)) and len(names) == count and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def run(argv: tp.Optional[tp.Sequence[str]] = None, out: tp.TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffq_c.inspect",
        description="Show what a quantizer learned: bits, sizes and compression of a saved state.")
    parser.add_argument("file", help="a state from get_quantized_state(), or a checkpoint dict holding one")
    parser.add_argument("--model", metavar="pkg.module:factory",
                        help="a callable that builds the model: names and exact sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="out.png", help="bits per entry and a histogram of group bits")
    args = parser.parse_args(argv)
    try:
        obj = _read(args.file)
        state, where = find_state(obj)
        names, numels = _names_in(state, len(state["quantized"])), None
        if args.model:
            klass, kwargs = _settings(state)
            params = _model_params(args.model, klass, kwargs)
            names, numels = [n for n, _ in params], [n for _, n in params]
        report, group_bits = summarize(state, names, numels)
        if args.plot:
            plot(report, group_bits, args.plot)
    except InspectError as exc:
        print(f"diffq_c.inspect: {args.file}: {exc}; expected {EXPECTED}", file=sys.stderr)
        return 1
    if args.json:
        json.dump({"file": args.file, "found_at": where, **report}, out,
                  default=str)
        out.write("\n")
    else:
        out.write(format_text(report, args.file, where) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run())
