#!/bin/sh
# Robustness checks for CI: the C tests (kernels, validation, 64-bit index
# arithmetic) under AddressSanitizer and UndefinedBehaviorSanitizer, then a
# bounded libFuzzer run of unpack + dequantize (FUZZ_TIME seconds, default
# 30). Installs clang when it is missing. Exits non-zero on any failure.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v clang >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    fi
    echo "robust.sh: installing clang (for libFuzzer)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null
fi

echo "robust.sh: C tests under ASan and UBSan"
make -C "$ROOT/csrc" asan ubsan
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
    echo "robust.sh: the same built for x86-64-v4 (the FMA and AVX-512 paths)"
    make -C "$ROOT/csrc" asan-avx512 ubsan-avx512
else
    echo "robust.sh: no AVX-512 here: the x86-64-v4 sanitizer builds skipped"
fi

echo "robust.sh: fuzz_unpack, ${FUZZ_TIME:-30} s"
FUZZ_TIME="${FUZZ_TIME:-30}" "$ROOT/fuzz/run.sh"
echo "robust.sh: all passed"
