"""What pyproject.toml declares holds for the code: the oldest Python it
accepts parses every module, and the sdist carries what the build needs."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return f.read()


def test_modules_parse_on_the_oldest_declared_python():
    match = re.search(r'^requires-python\s*=\s*">=\s*3\.(\d+)"', _pyproject(), re.M)
    assert match, "requires-python should be a plain lower bound"
    oldest = (3, int(match.group(1)))
    files = glob.glob(os.path.join(ROOT, "diffq_c", "*.py"))
    assert len(files) > 10
    for path in files:
        with open(path) as f:
            ast.parse(f.read(), filename=path, feature_version=oldest)


def test_sdist_manifest_includes_the_kernel_headers():
    """setup.py lists the .c files only; without the headers the sdist
    cannot build (`python -m build` builds the wheel from the sdist)."""
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    assert "csrc/*.h" in manifest.split()
    included = re.findall(r'#include "([^"]+)"', "".join(
        open(p).read() for p in glob.glob(os.path.join(ROOT, "csrc", "*.c"))
        + [os.path.join(ROOT, "diffq_c", "_binding.cpp")]))
    assert included
    for name in set(included):
        assert os.path.exists(os.path.join(ROOT, "csrc", name)), f"{name} is not under csrc/"
