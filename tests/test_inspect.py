"""python -m diffq_c.inspect on states written by diffq (the oracle) and by
diffq_c: bits statistics against each quantizer's own stored bits, sizes,
checkpoints, JSON, the plot, and refusals of files that are not states."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diffq
import diffq_c
from diffq_c import inspect as dq_inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = {"diffq": diffq, "diffq_c": diffq_c}

FACTORY = textwrap.dedent("""
    import torch

    def build():
        return torch.nn.Sequential(torch.nn.Conv1d(4, 16, 3), torch.nn.ReLU(), torch.nn.Conv1d(16, 8, 1),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 6, 8))
""")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """An importable `inspect_models:build` for --model."""
    (tmp_path / "inspect_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("inspect_models", None)
    namespace = {}
    exec(FACTORY, namespace)
    return namespace["build"]


def _learned(lib, build, min_tail=True, **kwargs):
    """A DiffQuantizer whose groups have varied bits, the last groups of
    each parameter at min_bits when `min_tail` (those look like padding in
    a packed state)."""
    torch.manual_seed(1)
    model = build()
    quantizer = lib.DiffQuantizer(model, min_size=0, **kwargs)
    generator = torch.Generator().manual_seed(2)
    for qparam in quantizer._qparams:
        logit = qparam.logit.data
        logit.copy_(torch.randn(logit.shape, generator=generator) * 3)
        if logit.numel() > 1:
            if min_tail:
                logit[-(logit.numel() // 2):] = -30.0
            else:
                logit[-1] = 0.0  # halfway: above min_bits
    return model, quantizer


def _run(args):
    out = io.StringIO()
    code = dq_inspect.run([str(a) for a in args], out=out)
    return code, out.getvalue()


def _report(args):
    code, text = _run(list(args) + ["--json"])
    assert code == 0
    return json.loads(text)


def _true_bits(quantizer):
    """Each parameter's stored bits, from the quantizer's unpacked state."""
    return [entry[2].flatten().to(torch.float64) for entry in
            quantizer.get_quantized_state(packed=False)["quantized"]]


@pytest.mark.parametrize("lib_name", ["diffq", "diffq_c"])
@pytest.mark.parametrize("group_size,packed", [(8, True), (1, True), (0, True), (8, False)])
def test_bits_and_sizes_match_the_quantizer(lib_name, group_size, packed, factory, tmp_path):
    lib = LIBS[lib_name]
    model, quantizer = _learned(lib, factory, group_size=group_size)
    path = tmp_path / "q.th"
    torch.save(quantizer.get_quantized_state(packed=packed), path)
    report = _report([path, "--model", "inspect_models:build"])
    truth = _true_bits(quantizer)
    params = [qp.param for qp in quantizer._qparams]
    names = [name for name, p in model.named_parameters() if not name.endswith("_diffq")]
    assert [e["name"] for e in report["entries"]] == names
    assert len(report["entries"]) == len(truth) == len(params)
    for entry, bits, param in zip(report["entries"], truth, params):
        assert entry["exact"]
        assert entry["values"] == param.numel()
        assert entry["group_size"] == (group_size or param.numel())
        assert entry["mean_bits"] == pytest.approx(float(bits.mean()))
        assert entry["min_bits"] == float(bits.min())
        assert entry["max_bits"] == float(bits.max())
    assert len({e["min_bits"] for e in report["entries"]} | {e["max_bits"] for e in report["entries"]}) > 1
    totals = report["totals"]
    assert totals["float32_bytes"] == 4 * sum(p.numel() for p in model.parameters()
                                              if not any(p is q.logit for q in quantizer._qparams))
    assert totals["compression"] == pytest.approx(totals["float32_bytes"] / totals["stored_bytes"])


@pytest.mark.parametrize("lib_name", ["diffq", "diffq_c"])
def test_packed_state_without_model(lib_name, factory, tmp_path):
    """Without the model, a packed state gives the smallest counts its
    packed tensors allow: the true ones when the last group is above
    min_bits, fewer when trailing groups sit at min_bits (stored as 0, like
    the padding). The count is exact only when no group is at min_bits (the
    padding then cannot be groups; these parameters are far from filling a
    packed line)."""
    lib = LIBS[lib_name]
    for min_tail in (False, True):
        _, quantizer = _learned(lib, factory, min_tail=min_tail, group_size=4)
        path = tmp_path / "q.th"
        torch.save(quantizer.get_quantized_state(), path)
        report = _report([path])
        truth = _true_bits(quantizer)
        fewer = []
        for entry, bits in zip(report["entries"], truth):
            assert entry["name"] is None
            assert entry["exact"] == (not bool((bits == 2).any()))
            assert entry["group_size"] == 4
            assert entry["max_bits"] == float(bits.max())
            if min_tail:
                # past the last group above min_bits, and holding at least
                # one min_bits group, since the state has levels of that width
                above = torch.nonzero(bits > 2).flatten()
                groups = int(above.max()) + 1 if above.numel() else 0
                groups += not bool((bits[:groups] == 2).any())
                assert entry["values"] == 4 * groups <= 4 * bits.numel()
                fewer.append(groups < bits.numel())
                bits = bits[:groups]
            else:
                assert entry["values"] == 4 * bits.numel()
            assert entry["mean_bits"] == pytest.approx(float(bits.mean()))
            assert entry["min_bits"] == float(bits.min())
        assert report["totals"]["exact"] == all(e["exact"] for e in report["entries"])
        assert not min_tail or (not report["totals"]["exact"] and any(fewer))
        _, text = _run([path])
        assert ("--model gives the exact one" in text) == (not report["totals"]["exact"])


def test_checkpoint_float16_and_torch_pack(factory, tmp_path):
    model, quantizer = _learned(diffq_c, factory, group_size=8)
    small = diffq_c.DiffQuantizer(factory(), group_size=8, min_size=0.001, float16=True)
    path = tmp_path / "ckpt.th"
    torch.save({"epoch": 3, "best": {"state": small.get_quantized_state(torch_pack=True)}}, path)
    report = _report([path, "--model", "inspect_models:build"])
    assert report["found_at"] == "['best']['state']"
    assert report["torch_pack"] and report["packed"]
    kept = [p for p in small._float16]
    assert report["float16"] == {"tensors": len(kept), "values": sum(p.numel() for p in kept),
                                 "bytes": 2 * sum(p.numel() for p in kept)}
    assert len(report["entries"]) == len(small._qparams) and all(e["exact"] for e in report["entries"])
    code, text = _run([path])
    assert code == 0 and "at ['best']['state']" in text


@pytest.mark.parametrize("lib_name", ["diffq", "diffq_c"])
@pytest.mark.parametrize("kind", ["uniform", "lsq"])
def test_fixed_bits_quantizers(lib_name, kind, factory, tmp_path):
    lib = LIBS[lib_name]
    model = factory()
    quantizer = (lib.UniformQuantizer(model, bits=5, min_size=0) if kind == "uniform"
                 else lib.LSQ(model, bits=4, min_size=0))
    bits = 5 if kind == "uniform" else 4
    for packed in (False, True):
        path = tmp_path / "q.th"
        torch.save(quantizer.get_quantized_state(packed=packed), path)
        report = _report([path, "--model", "inspect_models:build"])
        numels = [qp.param.numel() for qp in quantizer._qparams]
        assert [e["values"] for e in report["entries"]] == numels
        assert all(e["mean_bits"] == e["min_bits"] == e["max_bits"] == bits for e in report["entries"])
        alone = _report([path])["entries"]
        for with_model, without in zip(report["entries"], alone):
            assert without["name"] is None and without["mean_bits"] == bits
            if packed:  # zero levels at the end look like padding
                assert without["values"] <= with_model["values"]
            else:
                assert without["values"] == with_model["values"] and without["exact"]


def test_text_rows_and_plot(factory, tmp_path):
    _, quantizer = _learned(diffq_c, factory, group_size=8)
    path = tmp_path / "q.th"
    torch.save(quantizer.get_quantized_state(), path)
    png = tmp_path / "bits.png"
    code, text = _run([path, "--model", "inspect_models:build", "--plot", png])
    assert code == 0
    rows = [line for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row.split()[1] for row in rows] == ["0.weight", "0.bias", "2.weight", "2.bias",
                                                "4.weight", "4.bias"]
    assert "compression" in text
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diffq_c.inspect", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_refuses_what_is_not_a_state(tmp_path):
    marker = tmp_path / "ran"
    bad = {"text.th": None, "tensor.th": torch.zeros(3), "dict.th": {"a": 1},
           "code.th": {"state": _Payload(marker)}}
    for name, obj in bad.items():
        path = tmp_path / name
        if obj is None:
            path.write_text("not a state\n")
        else:
            torch.save(obj, path)
    for name in list(bad) + ["missing.th"]:
        done = _cli(tmp_path / name, cwd=tmp_path)
        assert done.returncode == 1, (name, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert str(tmp_path / name) in lines[0] and "get_quantized_state" in lines[0]
        assert done.stdout == ""
    assert not marker.exists(), "pickled code ran"


def test_cli_reads_a_diffq_state_and_prints_json(factory, tmp_path):
    _, quantizer = _learned(diffq, factory, group_size=8)
    path = tmp_path / "q.th"
    torch.save(quantizer.get_quantized_state(), path)
    done = _cli(path, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["quantizer"] == "DiffQuantizer" and len(report["entries"]) == 6


def test_model_of_another_shape_is_refused(factory, tmp_path):
    _, quantizer = _learned(diffq_c, factory, group_size=8)
    path = tmp_path / "q.th"
    torch.save(quantizer.get_quantized_state(), path)
    (tmp_path / "other_models.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(8, 8)\n")
    code, _ = _run([path, "--model", "other_models:build"])
    assert code == 1
