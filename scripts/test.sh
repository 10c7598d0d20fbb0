#!/usr/bin/env bash
# Sets up (if needed) and runs every test: all tests on Deno's WebGPU (wgpu on
# lavapipe here), then the GPU tests (*.gpu.test.ts) again on Dawn (SwiftShader).
# Ends with one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests || exit 1
source scripts/env.sh
results=$(mktemp -d)
filter=("$@")

# Each test process runs under a time limit (a hang fails the run instead of lasting forever);
# nothing is retried. The Dawn "stalls" that a retry used to hide were Dawn's Node bindings
# busy-polling the GPU with one new native function per setImmediate tick: Deno's N-API frees
# those finalizers in time quadratic in their number, so each major GC froze the JS thread for
# seconds to minutes. src/engine/gpu/dawn_event_pump.ts bounds the polling; docs/backends.md has
# the measurements. A normal Dawn run takes well under its limit here.
# One crash is told apart, not retried: Mesa's lavapipe (LLVM 15) rarely aborts the process with
# glibc heap corruption ("malloc_consolidate(): invalid chunk size", SIGABRT) while it exits,
# after the report is written. Such a run is judged by its report, and says so.
run_suite() { # name, time limit in seconds, then the deno test arguments
  local name=$1 limit=$2 rc
  shift 2
  timeout --signal=KILL "$limit" "$DENO" test -A --junit-path="$results/$name.xml" "$@"
  rc=$?
  if [ $rc -eq 134 ] && "$DENO" run -A scripts/summarize-junit.ts "$results/$name.xml" >/dev/null; then
    echo "== the $name test process aborted (SIGABRT) after writing a report with no failure:"
    echo "   the report decides (lavapipe's exit-time heap corruption; see scripts/test.sh)"
    return 0
  fi
  if [ $rc -gt 128 ]; then
    echo "== the $name test process died by signal $((rc - 128)) (9: over its ${limit} s limit)"
  fi
  return $rc
}

times=()
timed() { # part name, then the command; records the part's wall time
  local name=$1 start=$SECONDS rc
  shift
  "$@"
  rc=$?
  times+=("$(printf '%-28s %4d s  (exit %d)' "$name" $((SECONDS - start)) $rc)")
  return $rc
}

echo "== deno fmt --check, deno lint"
timed "format and lint" bash -c '"$0" fmt --check && "$0" lint' "$DENO"
static_rc=$?

echo "== deno test (all tests, backend wgpu)"
MACE_BACKEND=wgpu timed "tests on wgpu (lavapipe)" run_suite wgpu 900 tests/ "${filter[@]}"
wgpu_rc=$?

echo "== deno test (GPU tests, backend dawn on SwiftShader)"
mapfile -t gpu_tests < <(find tests -name '*.gpu.test.ts' | sort)
MACE_BACKEND=dawn VK_ICD_FILENAMES="$SWIFTSHADER_ICD" \
  timed "GPU tests on dawn (SwiftShader)" run_suite dawn 1200 "${gpu_tests[@]}" "${filter[@]}"
dawn_rc=$?

echo "== time per part"
printf '%s\n' "${times[@]}"
"$DENO" run -A scripts/summarize-junit.ts "$results/wgpu.xml" "$results/dawn.xml"
summary_rc=$?
rm -rf "$results"
[ $static_rc -eq 0 ] && [ $wgpu_rc -eq 0 ] && [ $dawn_rc -eq 0 ] && [ $summary_rc -eq 0 ]
