#!/bin/sh
# Bounded libFuzzer run of fuzz_unpack: FUZZ_TIME seconds (default 30) or
# FUZZ_RUNS inputs (default unbounded), whichever ends first. New inputs go
# to fuzz/work/corpus (not committed), crashes to fuzz/work/. Exits non-zero
# when the fuzzer finds a crash, a leak or a failed property.
#
# Longer runs: FUZZ_TIME=3600 fuzz/run.sh, or in parallel
#   FUZZ_TIME=3600 FUZZ_JOBS=4 fuzz/run.sh
# Reproduce a crash: fuzz/fuzz_unpack fuzz/work/crash-<hash>
set -eu
cd "$(dirname "$0")"
: "${FUZZ_TIME:=30}"
: "${FUZZ_RUNS:=-1}"
: "${FUZZ_JOBS:=1}"
make -s fuzz_unpack
mkdir -p work/corpus
set -- -max_total_time="$FUZZ_TIME" -runs="$FUZZ_RUNS" -timeout=10 -rss_limit_mb=2048 \
    -max_len=16384 -artifact_prefix=work/ -print_final_stats=1
if [ "$FUZZ_JOBS" -gt 1 ]; then
    set -- "$@" -jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"
fi
exec ./fuzz_unpack "$@" work/corpus corpus
