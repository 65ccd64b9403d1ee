import copy
import importlib.util
import pathlib

import pytest
import torch

# The oracle must be there: a missing diffq is a failure, not a skip.
import diffq  # noqa: F401


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def twin_models(factory):
    """The same model twice (identical weights), one for diffq, one for us."""
    model = factory()
    return model, copy.deepcopy(model)


def randomize_logits(ours, theirs, low=-4.0, high=3.0, generator=None):
    """Random logits, copied into both quantizers. The default range keeps
    the bits below 14.5: diffq loses 15-bit groups when packing."""
    with torch.no_grad():
        for a, b in zip(ours._qparams, theirs._qparams):
            if a.other is None:
                a.logit.uniform_(low, high, generator=generator)
                b.logit.copy_(a.logit)


def load_benchmark(name):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
