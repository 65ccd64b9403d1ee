"""One OpenMP runtime per process: diffq_c's kernels use the libgomp torch
loaded (diffq_c/_openmp.py), in a source build as in a wheel."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import diffq_c
from diffq_c import _openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")


def _run(code_or_script, *, script=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, code_or_script] if script else [sys.executable, "-c", code_or_script]
    # from a directory that is not the source tree, as a user would
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=os.path.dirname(ROOT),
                          timeout=300)


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps")
def test_smoke_script_passes_on_this_build():
    """tests/smoke_wheel.py is what CI runs on the installed wheel; here on
    the build under test: multi-threaded kernels, a train/save/restore round
    trip, and one libgomp mapped after `import torch, diffq_c`."""
    done = _run(os.path.join(ROOT, "tests", "smoke_wheel.py"), script=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke: OK" in done.stdout


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps")
def test_the_one_runtime_is_torchs_own():
    """When torch ships a libgomp (its wheels do, under a plain or a hashed
    name), that file is the only one mapped: the extension brought none,
    and the system's libgomp.so.1 was not loaded beside it."""
    shipped = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))
    done = _run("import torch, diffq_c\n"
                "from diffq_c import _openmp, ops\n"
                "print(ops.kernels_available())\n"
                "print('\\n'.join(_openmp.mapped_runtimes()))\n")
    assert done.returncode == 0, done.stderr
    loaded, *mapped = done.stdout.split("\n")[:-1]
    assert loaded == "True"
    assert len(mapped) == 1, mapped
    if shipped:
        assert os.path.realpath(mapped[0]) in {os.path.realpath(p) for p in shipped}


@pytest.mark.skipif(not LINUX or shutil.which("readelf") is None, reason="ELF, readelf")
def test_extension_does_not_link_an_openmp_runtime():
    from diffq_c import _C

    dynamic = subprocess.run(["readelf", "-d", "--dyn-syms", "-W", _C.__file__],
                             capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not any("gomp" in line or "omp.so" in line for line in needed), needed
    # compiled with OpenMP all the same: its GOMP entry points are left to bind at import
    assert any(line.split()[-2:] == ["UND", "GOMP_parallel"] for line in dynamic.splitlines()), \
        "no undefined GOMP_parallel"


MAPS = """\
7f0000000000-7f0000001000 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000001000-7f0000002000 r-xp 00001000 08:01 12 /opt/my env/torch/lib/libgomp-a34b3233.so.1
7f0000002000-7f0000003000 r--p 00002000 08:01 12 /opt/my env/torch/lib/libgomp-a34b3233.so.1
7f0000003000-7f0000004000 r-xp 00000000 08:01 13 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0
7f0000004000-7f0000005000 rw-p 00000000 00:00 0
7f0000005000-7f0000006000 r--p 00000000 08:01 14 /opt/my env/torch/lib/libgompish.txt
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0                          [stack]
"""


def test_mapped_runtimes_reads_hashed_names_and_paths_with_spaces():
    assert _openmp.mapped_runtimes(MAPS) == ["/opt/my env/torch/lib/libgomp-a34b3233.so.1",
                                             "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"]
    assert _openmp.mapped_runtimes("") == []


def test_choose_runtime_prefers_torchs_copy(tmp_path):
    torch_dir = tmp_path / "torch"
    (torch_dir / "lib").mkdir(parents=True)
    ours = str(torch_dir / "lib" / "libgomp-0123abcd.so.1")
    system = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    assert _openmp.choose_runtime([system, ours], str(torch_dir)) == ours
    assert _openmp.choose_runtime([system], str(torch_dir)) == system
    # a sibling directory whose name starts like torch's is not torch's
    other = str(tmp_path / "torch2" / "libgomp.so.1")
    assert _openmp.choose_runtime([other, system], str(torch_dir)) == other


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps")
def test_runtime_in_use_is_mapped_in_this_process():
    assert diffq_c._openmp.RUNTIME is not None
    assert os.path.realpath(diffq_c._openmp.RUNTIME) in {
        os.path.realpath(p) for p in _openmp.mapped_runtimes()}
