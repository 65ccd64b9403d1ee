"""The OpenMP runtime of the C kernels is the one torch already loaded.

On Linux, `diffq_c._C` is linked without libgomp (see setup.py): its
GOMP_*/omp_* references are left undefined and bound when the module is
loaded, to whatever runtime is in the process's global symbol scope. This
module puts torch's own libgomp there first, so the kernels and torch share
one thread pool:

- torch's wheels ship their libgomp in torch/lib, under a hashed file name
  and soname in some releases (`libgomp-a34b3233.so.1`) and a plain one in
  others. An extension that kept a NEEDED entry on `libgomp.so.1` would load
  the system's copy beside a hashed one, and a wheel repaired by auditwheel
  would carry a third: two runtimes in one process oversubscribe the cores
  and can crash at exit. Binding by symbol, not by file name, works with any
  of these.
- the runtime is found from /proc/self/maps (what is mapped, whatever its
  name), so no hash is hard-coded.
- a torch built without a mapped libgomp (another OpenMP, or none) leaves
  the system's libgomp as the fallback; when there is none either, `_C`
  fails to import and ops.py falls back to the pure torch path with a
  warning that names the missing symbol.

A library dlopen'ed again with RTLD_GLOBAL is not loaded twice: glibc
finds it among the loaded objects (by name or by device and inode) and
only promotes it to the global scope.
"""
import ctypes
import ctypes.util
import os
import sys
import typing as tp

MAPS = "/proc/self/maps"


def is_openmp_runtime(path: str) -> bool:
    """Whether a mapped file is a GNU OpenMP runtime (libgomp*.so*)."""
    name = os.path.basename(path)
    return name.startswith("libgomp") and ".so" in name


def mapped_runtimes(maps_text: tp.Optional[str] = None) -> tp.List[str]:
    """Distinct libgomp files mapped in this process (or in `maps_text`,
    /proc/<pid>/maps' format), in the order they appear."""
    if maps_text is None:
        try:
            with open(MAPS) as f:
                maps_text = f.read()
        except OSError:
            return []
    found = []
    for line in maps_text.splitlines():
        # address perms offset dev inode path; the path may hold spaces
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            path = fields[5].strip()
            if path.endswith(" (deleted)"):
                path = path[:-len(" (deleted)")]
            if is_openmp_runtime(path) and path not in found:
                found.append(path)
    return found


def choose_runtime(mapped: tp.Sequence[str], torch_dir: tp.Optional[str]) -> tp.Optional[str]:
    """torch's copy when torch mapped one, else the first mapped runtime, else
    the system's libgomp (None when there is none)."""
    if torch_dir:
        prefix = os.path.join(os.path.realpath(torch_dir), "")
        for path in mapped:
            if os.path.realpath(path).startswith(prefix):
                return path
    if mapped:
        return mapped[0]
    return ctypes.util.find_library("gomp")


def _torch_dir() -> tp.Optional[str]:
    torch = sys.modules.get("torch")
    location = getattr(torch, "__file__", None)
    return os.path.dirname(location) if location else None


def make_runtime_global() -> tp.Optional[str]:
    """Promote the chosen runtime to the global scope; the path used, or
    None when no runtime could be loaded."""
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the extension links its runtime as usual
    import torch  # noqa: F401  (loads torch's runtime, when it has one)

    path = choose_runtime(mapped_runtimes(), _torch_dir())
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    return path


RUNTIME = make_runtime_global()
