"""Build of diffq_c: C11 kernels (csrc/) and one pybind11 binding.

Nothing here imports torch: the extension exchanges buffers through DLPack,
so it builds without torch installed and one build works with any torch >= 2.4.
"""
import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

# On Linux the extension does not link libgomp: its OpenMP symbols bind at
# import to the runtime torch already loaded (diffq_c/_openmp.py says why),
# so a wheel carries no runtime of its own and a process maps one libgomp.
LINK_RUNTIME_AT_IMPORT = sys.platform.startswith("linux")

KERNELS = ["csrc/rng.c", "csrc/noise.c", "csrc/quantize.c", "csrc/bitpack.c", "csrc/size.c",
           "csrc/lsq.c", "csrc/validate.c", "csrc/multi.c"]


def _compiler_accepts(compiler, flag):
    """Whether the C compiler builds and links a file with `flag`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 0; }\n"
                    if "openmp" in flag else "int main(void) { return 0; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """Per-language flags (C11 for kernels, C++17 for the binding) and
    OpenMP when the compiler has it; without it the kernels run serially."""

    def build_extensions(self):
        compiler = self.compiler
        openmp = os.environ.get("DIFFQ_C_NO_OPENMP") != "1" and _compiler_accepts(compiler, "-fopenmp")
        if not openmp:
            print("diffq_c: building without OpenMP", file=sys.stderr)
        original_compile = compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            if src.endswith(".c"):
                extra = [a for a in extra if not a.startswith("-std=")] + ["-std=c11"]
            if openmp:
                extra.append("-fopenmp")
            return original_compile(obj, src, ext, cc_args, extra, pp_opts)

        compiler._compile = compile_one
        for ext in self.extensions:
            if openmp and not LINK_RUNTIME_AT_IMPORT:
                ext.extra_link_args.append("-fopenmp")
        try:
            super().build_extensions()
        finally:
            compiler._compile = original_compile


ext = Pybind11Extension(
    "diffq_c._C",
    ["diffq_c/_binding.cpp"] + KERNELS,
    include_dirs=["csrc"],
    cxx_std=17,
    # no contraction: levels must match a plain float32 evaluation bit for bit
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden", "-DNDEBUG"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
