"""Smoke test of an installed diffq_c (a wheel in a fresh venv, or the
editable build): the kernels load, run on several threads of the one OpenMP
runtime in the process, and a short training round trips through a saved
packed state.

Run it from outside the source tree so that the installed package is the
one imported: `cd /tmp && python /path/to/tests/smoke_wheel.py`. Exits
non-zero with a message on the first failed check.
"""
import io
import os
import sys

import torch


def openmp_files() -> set:
    """libgomp files mapped in this process, read independently of diffq_c's
    own lookup so the check does not trust the code it checks."""
    with open("/proc/self/maps") as f:
        paths = {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}
    return {p for p in paths if os.path.basename(p).startswith("libgomp")}


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def check_kernels_use_threads(diffq_c) -> None:
    """libgomp starts a team's workers on the first parallel region that
    asks for them: a pack over many chunks at 3 threads, with no parallel
    region run before, must add two threads to the process."""
    from diffq_c import bitpack, ops

    if not ops.kernels_available():
        sys.exit("smoke: the C kernels did not load")
    torch.set_num_threads(1)  # the input is made without starting a team
    values = torch.randint(0, 8, (1 << 20,), dtype=torch.int16)
    before = threads()
    torch.set_num_threads(3)
    packed = bitpack.pack(values, 3)
    after = threads()
    if not torch.equal(bitpack.unpack(packed, values.numel()), values):
        sys.exit("smoke: pack/unpack round trip differs")
    if after < before + 2:
        sys.exit(f"smoke: a 3-thread kernel left {before} -> {after} threads: not multi-threaded")


def train_and_restore(diffq) -> None:
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    quantizer = diffq.DiffQuantizer(model, group_size=8)
    quantizer.setup_optimizer(optimizer)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    buffer = io.BytesIO()
    torch.save(quantizer.get_quantized_state(packed=True), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = make()
    diffq.restore_quantized_state(fresh, state)
    quantizer.quantize()
    for (name, want), got in zip(model.named_parameters(), fresh.parameters()):
        if not torch.equal(want, got):
            sys.exit(f"smoke: restored {name} differs from the quantized weights")
    if not torch.equal(model(x), fresh(x)):
        sys.exit("smoke: the restored model's outputs differ")


def main() -> None:
    import diffq_c as diffq

    check_kernels_use_threads(diffq)
    train_and_restore(diffq)
    runtimes = openmp_files()
    if len(runtimes) != 1:
        sys.exit(f"smoke: expected one libgomp mapped after import torch, diffq_c, got {sorted(runtimes)}")
    print(f"smoke: OK ({diffq.__file__}; OpenMP runtime {runtimes.pop()})")


if __name__ == "__main__":
    main()
