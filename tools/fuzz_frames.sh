#!/usr/bin/env bash
# Builds the frame-decoder fuzzer with clang (ASan + UBSan + libFuzzer) and runs RUNS inputs
# (default 1,000,000) from a seed corpus of valid frames. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
build=build/fuzz
CC=clang-14 CXX=clang++-14 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DIM_BUILD_FUZZ=ON -DIM_BUILD_PYTHON=OFF >/dev/null
cmake --build "$build" --target frame_decoder_fuzz
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
python fuzz/make_seed_corpus.py "$corpus"
log="$corpus/fuzz.log"
status=0
"$build/fuzz/frame_decoder_fuzz" -runs="$runs" -max_len=4096 -print_final_stats=1 "$corpus" >"$log" 2>&1 || status=$?
grep -E "^Done|number_of_executed_units|ERROR|SUMMARY" "$log" || true
if [ "$status" -ne 0 ]; then
  tail -n 60 "$log"
  echo "frame decoder fuzzing FAILED (exit $status)" >&2
fi
exit "$status"
