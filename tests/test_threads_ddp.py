"""Concurrency: DiffQuantizers trained in parallel Python threads, and under
DistributedDataParallel (gloo, two processes on loopback).

The noise of a training forward is a pure function of one seed per forward.
By default that seed comes from torch's global generator, which every thread
shares: two models trained at once get their seeds in whatever order the
threads reach it. A `generator` per quantizer makes each run independent of
the others, so parallel training gives bitwise the results of sequential
training.
"""
import os
import tempfile
import time
import threading

import pytest
import torch
from torch import nn
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import diffq_c
from diffq_c import ops

STEPS = 12


def _make_run(seed: int, with_generator: bool = True):
    """A small model, its data and optimizer, all seeded from `seed` without
    touching the global generator; returns a `step()` closure and the parts."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(STEPS, 16, 32, generator=g)
    y = torch.randint(0, 16, (STEPS, 16), generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    quantizer = diffq_c.DiffQuantizer(
        model, min_size=0.0, group_size=8,
        generator=torch.Generator().manual_seed(seed + 1000) if with_generator else None)
    quantizer.setup_optimizer(optimizer, lr=1e-2)
    record = {"losses": [], "outputs": []}

    def step(i):
        model.train()
        out = model(x[i])
        loss = nn.functional.cross_entropy(out, y[i]) + 1e-3 * quantizer.model_size()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record["losses"].append(loss.detach().clone())
        record["outputs"].append(out.detach().clone())

    def result():
        model.eval()
        with torch.no_grad():
            record["eval"] = model(x[0]).clone()
        record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return record

    return step, result


def _assert_same_run(a, b):
    assert sorted(a["params"]) == sorted(b["params"])
    assert any(n.endswith("_diffq") for n in a["params"])
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for key in ("losses", "outputs"):
        assert len(a[key]) == len(b[key]) == STEPS
        for i, (u, v) in enumerate(zip(a[key], b[key])):
            assert torch.equal(u, v), f"{key}[{i}]"
    assert torch.equal(a["eval"], b["eval"])


def _sequential(seeds, with_generator=True):
    results = []
    for seed in seeds:
        step, result = _make_run(seed, with_generator)
        for i in range(STEPS):
            step(i)
        results.append(result())
    return results


def test_parallel_threads_match_sequential_runs():
    seeds = (1, 2)
    expected = _sequential(seeds)
    runs = [_make_run(seed) for seed in seeds]
    barrier = threading.Barrier(len(runs))
    errors = []

    def train(step):
        try:
            barrier.wait()
            for i in range(STEPS):
                step(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(step,)) for step, _ in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (_, result), want in zip(runs, expected):
        _assert_same_run(result(), want)


def test_interleaving_on_the_global_generator_changes_results():
    """Why the generator exists: without one, the order in which two runs
    draw their seeds from the global generator decides their noise. Here
    the interleaving of two threads is replayed deterministically in one."""
    torch.manual_seed(0)
    sequential = _sequential((1, 2), with_generator=False)
    torch.manual_seed(0)
    runs = [_make_run(seed, with_generator=False) for seed in (1, 2)]
    for i in range(STEPS):
        for step, _ in runs:
            step(i)
    interleaved = [result() for _, result in runs]
    assert not torch.equal(interleaved[0]["losses"][-1], sequential[0]["losses"][-1])
    # with generators the same interleaving changes nothing
    sequential = _sequential((1, 2))
    runs = [_make_run(seed) for seed in (1, 2)]
    for i in range(STEPS):
        for step, _ in runs:
            step(i)
    for (_, result), want in zip(runs, sequential):
        _assert_same_run(result(), want)


def test_default_seeds_come_from_the_global_generator():
    """Default behaviour, as diffq: one draw from the global generator per
    training forward, so torch.manual_seed replays a run. With a generator
    the global one is left alone, and the generator is not saved in states."""
    model = nn.Linear(8, 4)
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.0)
    quantizer.no_optimizer()
    x = torch.randn(2, 8)
    torch.manual_seed(5)
    out_a = model(x)
    after_a = torch.get_rng_state()
    torch.manual_seed(5)
    ops.draw_seed()
    assert torch.equal(after_a, torch.get_rng_state())  # exactly one draw
    torch.manual_seed(5)
    assert torch.equal(model(x), out_a)
    quantizer.detach()

    gen = torch.Generator().manual_seed(3)
    quantizer = diffq_c.DiffQuantizer(model, min_size=0.0, generator=gen)
    quantizer.no_optimizer()
    before = torch.get_rng_state()
    gen_before = gen.get_state()
    model(x)
    assert torch.equal(before, torch.get_rng_state())
    assert not torch.equal(gen_before, gen.get_state())
    state = quantizer.get_quantized_state()
    assert "generator" not in state["meta"]["init_kwargs"]
    assert "generator" not in repr(quantizer)
    diffq_c.restore_quantized_state(nn.Linear(8, 4), state)


def test_generator_also_drives_the_torch_path():
    """float64 parameters take the pure torch path: its noise comes from the
    generator too, so runs replay from the generator alone."""
    outs = []
    for _ in range(2):
        torch.manual_seed(len(outs))  # a different global state each time
        model = nn.Linear(8, 4).double()
        with torch.no_grad():
            model.weight.copy_(torch.arange(32, dtype=torch.float64).view(4, 8) / 32)
            model.bias.zero_()
        quantizer = diffq_c.DiffQuantizer(model, min_size=0.0,
                                          generator=torch.Generator().manual_seed(9))
        quantizer.no_optimizer()
        outs.append(model(torch.ones(1, 8, dtype=torch.float64)))
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ DDP

DDP_STEPS = 4


def _ddp_worker(rank, world, outdir):
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick (a free port can be taken before
    # rank 0 binds it)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(outdir, "rendezvous"),
                            rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        quantizer = diffq_c.DiffQuantizer(model, min_size=0.0, group_size=4)
        optimizer = torch.optim.Adam(
            [p for n, p in model.named_parameters() if not n.endswith("_diffq")], lr=1e-2)
        quantizer.setup_optimizer(optimizer, lr=5e-2)
        ddp = DistributedDataParallel(model)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        noisy = []
        model[0].register_forward_pre_hook(lambda m, i: noisy.append(m.weight.detach().clone()))
        # each rank: its own noise seeds and its own batch
        torch.manual_seed(100 + rank)
        g = torch.Generator().manual_seed(200 + rank)
        for _ in range(DDP_STEPS):
            x = torch.randn(8, 16, generator=g)
            y = torch.randint(0, 4, (8,), generator=g)
            loss = nn.functional.cross_entropy(ddp(x), y) + 1e-2 * quantizer.model_size()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"initial": initial, "final": final, "noisy": noisy,
                    "logits_fused": optimizer.param_groups[-1].get("fused")},
                   os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # reached only when the work and the process group's teardown are done
    open(os.path.join(outdir, f"rank{rank}.finished"), "w").close()


# seconds: a run of both workers past this is a hang, and fails
DDP_TIMEOUT = 300.0
# seconds a worker that finished its teardown may take to exit
DDP_EXIT_GRACE = 10.0


def _spawn_ddp(outdir, worker=_ddp_worker, timeout=DDP_TIMEOUT, grace=DDP_EXIT_GRACE):
    """Run both workers. torch's gloo backend can abort a process at
    interpreter exit, after destroy_process_group ("terminate called without
    an active exception": Gloo threads still holding work, pytorch/pytorch
    issue 190489; seen here with torch alone too), or leave it hanging there
    (seen once, on Python 3.13). Either is let through only when both workers
    had finished their teardown and saved their results: an abort then, or a
    process still alive `grace` seconds after both finished (it is killed).
    Anything else fails the test, a run past `timeout` seconds included,
    instead of hanging it."""
    context = mp.spawn(worker, args=(2, outdir), nprocs=2, join=False)

    def finished(rank):
        return os.path.exists(os.path.join(outdir, f"rank{rank}.finished"))

    def saved():
        return all(os.path.exists(os.path.join(outdir, f"rank{r}.pt")) for r in (0, 1))

    start, all_finished = time.monotonic(), None
    try:
        while True:
            try:
                if context.join(timeout=0.5):
                    return
            except mp.ProcessExitedException as exc:
                if not (exc.signal_name == "SIGABRT" and finished(exc.error_index) and saved()):
                    raise
                return
            now = time.monotonic()
            if all_finished is None and finished(0) and finished(1) and saved():
                all_finished = now
            if all_finished is not None and now - all_finished > grace:
                return  # a teardown that does not exit: killed below
            if now - start > timeout:
                raise AssertionError(f"the DDP workers did not finish in {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(10)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_keeps_ranks_identical():
    with tempfile.TemporaryDirectory() as outdir:
        _spawn_ddp(outdir)
        r0, r1 = (torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in (0, 1))
    # under gloo the logits keep torch's default Adam (see BaseQuantizer._fused_options)
    assert r0["logits_fused"] is not True and r1["logits_fused"] is not True
    names = sorted(r0["final"])
    assert any(n.endswith("_diffq") for n in names) and any(n.endswith("weight") for n in names)
    for name in names:
        # DDP broadcast rank 0's parameters, logits included
        assert torch.equal(r0["initial"][name], r1["initial"][name]), name
        # every parameter and bit logit moved ...
        assert not torch.equal(r0["initial"][name], r0["final"][name]), name
        # ... and stayed identical on both ranks
        assert torch.equal(r0["final"][name], r1["final"][name]), name
    # although each rank drew its own noise
    assert len(r0["noisy"]) == DDP_STEPS
    assert not torch.equal(r0["noisy"][0], r1["noisy"][0])


def _aborting_worker(rank, world, outdir, finish=True):
    torch.save({}, os.path.join(outdir, f"rank{rank}.pt"))
    if rank == 1:
        for _ in range(1000):  # rank 0 has saved too before the abort
            if os.path.exists(os.path.join(outdir, "rank0.pt")):
                break
            time.sleep(0.01)
        if finish:
            open(os.path.join(outdir, f"rank{rank}.finished"), "w").close()
        os.abort()


def _aborting_early_worker(rank, world, outdir):
    _aborting_worker(rank, world, outdir, finish=False)


def test_ddp_spawn_lets_only_a_teardown_abort_through():
    """_spawn_ddp tolerates a SIGABRT only after the worker finished."""
    with tempfile.TemporaryDirectory() as outdir:
        _spawn_ddp(outdir, _aborting_worker)
    with tempfile.TemporaryDirectory() as outdir:
        with pytest.raises(mp.ProcessExitedException):
            _spawn_ddp(outdir, _aborting_early_worker)


def _hanging_worker(rank, world, outdir, finish=True):
    torch.save({}, os.path.join(outdir, f"rank{rank}.pt"))
    if finish:
        open(os.path.join(outdir, f"rank{rank}.finished"), "w").close()
    if rank == 1:
        time.sleep(3600)


def _hanging_early_worker(rank, world, outdir):
    _hanging_worker(rank, world, outdir, finish=rank == 0)


def test_ddp_spawn_lets_only_a_teardown_hang_through():
    """_spawn_ddp kills a worker that does not exit after both finished, and
    fails (rather than hangs) when one never finishes."""
    with tempfile.TemporaryDirectory() as outdir:
        start = time.monotonic()
        _spawn_ddp(outdir, _hanging_worker, timeout=60, grace=1)
        assert time.monotonic() - start < 30
    with tempfile.TemporaryDirectory() as outdir:
        with pytest.raises(AssertionError, match="did not finish in 3 s"):
            _spawn_ddp(outdir, _hanging_early_worker, timeout=3, grace=1)
