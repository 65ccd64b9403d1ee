"""Saving and loading quantized states: group_size=0, torch.load with
weights_only, diffq's states without diffq installed, and a demucs-style
save / load flow through `import diffq_c as diffq`."""
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import diffq  # the oracle: these tests must fail, not skip, without it
import diffq_c
from diffq_c import loading


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 8))


def make_quantizer(lib, kind, model):
    if kind == "diffq":
        return lib.DiffQuantizer(model, min_size=0.001, group_size=8, float16=True)
    if kind == "uniform":
        return lib.UniformQuantizer(model, bits=5, min_size=0.001)
    return lib.LSQ(model, bits=6, min_size=0.001)


KINDS = ["diffq", "uniform", "lsq"]
X = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))


def eval_output(model):
    model.eval()
    with torch.no_grad():
        return model(X)


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_group_size_zero_packed_state(tmp_path):
    theirs_model = mlp()
    theirs = diffq.DiffQuantizer(theirs_model, min_size=0.001, group_size=0)
    state = theirs.get_quantized_state()
    expected = eval_output(theirs_model)
    # diffq cannot read its own packed state back with group_size=0
    with pytest.raises(RuntimeError):
        diffq.restore_quantized_state(mlp(seed=1), state)
    fresh = mlp(seed=1)
    diffq_c.restore_quantized_state(fresh, state)
    assert torch.equal(eval_output(fresh), expected)

    ours_model = mlp()
    ours = diffq_c.DiffQuantizer(ours_model, min_size=0.001, group_size=0)
    assert torch.equal(eval_output(ours_model), expected)
    fresh = mlp(seed=1)
    diffq_c.restore_quantized_state(fresh, ours.get_quantized_state())
    assert torch.equal(eval_output(fresh), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_our_states_load_with_weights_only(kind, tmp_path):
    model = mlp()
    state = make_quantizer(diffq_c, kind, model).get_quantized_state()
    path = tmp_path / "state.th"
    torch.save(state, path)
    assert diffq_c.load(path)["meta"]["klass"] is state["meta"]["klass"]
    # after diffq_c.load, our classes are still allowed for plain torch.load
    # (weights_only=True: the default since torch 2.6, asked for here so that
    # older torch checks the same)
    loaded = torch.load(path, weights_only=True)
    assert loaded["meta"]["klass"] is state["meta"]["klass"]
    fresh = mlp(seed=1)
    diffq_c.restore_quantized_state(fresh, loaded)
    assert torch.equal(eval_output(fresh), eval_output(model))


@pytest.mark.parametrize("kind", KINDS)
def test_diffq_states_with_load(kind, tmp_path):
    model = mlp()
    state = make_quantizer(diffq, kind, model).get_quantized_state()
    path = tmp_path / "state.th"
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # refuses diffq's class
    loaded = diffq_c.load(path, map_location="cpu")
    assert loaded["meta"]["klass"].__module__.startswith("diffq_c.")
    fresh = mlp(seed=1)
    diffq_c.restore_quantized_state(fresh, loaded)
    assert torch.equal(eval_output(fresh), eval_output(model))
    with open(path, "rb") as f:  # a file object works too
        assert diffq_c.load(f)["meta"]["klass"] is loaded["meta"]["klass"]


def test_load_refuses_other_globals(tmp_path, monkeypatch):
    path = tmp_path / "evil.th"
    torch.save({"quantized": [], "meta": {"klass": os.getcwd}}, path)
    with pytest.raises(pickle.UnpicklingError):
        diffq_c.load(path)
    # and so does the unpickler kept for torch < 2.5
    monkeypatch.setattr(loading, "_safe_globals_available", lambda: False)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        diffq_c.load(path)


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_unpickler_reads_diffq_states(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_safe_globals_available", lambda: False)
    model = mlp()
    state = make_quantizer(diffq, kind, model).get_quantized_state()
    path = tmp_path / "state.th"
    torch.save(state, path)
    loaded = diffq_c.load(path)
    fresh = mlp(seed=1)
    diffq_c.restore_quantized_state(fresh, loaded)
    assert torch.equal(eval_output(fresh), eval_output(model))


def test_diffq_states_restore_without_diffq_installed(tmp_path):
    """States saved by the real diffq, loaded in a process where importing
    diffq fails."""
    for kind in KINDS:
        model = mlp()
        torch.save(make_quantizer(diffq, kind, model).get_quantized_state(),
                   tmp_path / f"{kind}.th")
        torch.save(eval_output(model), tmp_path / f"{kind}.out")
    torch.save(X, tmp_path / "x.th")
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class NoDiffq(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "diffq" or name.startswith("diffq."):
                    raise ImportError("diffq is not installed here")
                return None

        sys.meta_path.insert(0, NoDiffq())
        import torch
        import diffq_c
        root = {str(tmp_path)!r}
        x = torch.load(root + "/x.th")
        for kind in {KINDS!r}:
            path = root + "/" + kind + ".th"
            for weights_only in (True, False):
                try:
                    torch.load(path, weights_only=weights_only)
                except Exception:
                    pass
                else:
                    raise AssertionError("plain torch.load read a diffq state without diffq")
            state = diffq_c.load(path)
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 8))
            diffq_c.restore_quantized_state(model, state)
            model.eval()
            with torch.no_grad():
                assert torch.equal(model(x), torch.load(root + "/" + kind + ".out")), kind
        assert "diffq" not in sys.modules
        print("restored", {KINDS!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(diffq_c.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored" in result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_demucs_style_flow(kind, tmp_path):
    """What demucs does with diffq, with `import diffq_c as diffq`: train with
    the quantizer, save the quantized state in a package, load it and
    restore it into a fresh model."""
    import diffq_c as dq

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    quantizer = make_quantizer(dq, kind, model)
    if hasattr(quantizer, "setup_optimizer"):  # UniformQuantizer learns nothing
        quantizer.setup_optimizer(optimizer)
    target = torch.randn(4, 8)
    for _ in range(3):
        model.train()
        loss = torch.nn.functional.mse_loss(model(X), target)
        if kind == "diffq":
            loss = loss + 1e-3 * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    package = {"kwargs": {"seed": 5}, "state": quantizer.get_quantized_state()}
    path = tmp_path / "model.th"
    torch.save(package, path)

    loaded = torch.load(path)
    fresh = mlp(**loaded["kwargs"])
    dq.restore_quantized_state(fresh, loaded["state"])
    assert torch.equal(eval_output(fresh), eval_output(model))
    assert not [n for n, _ in fresh.named_parameters() if n.endswith(("_diffq", "_lsq"))]
