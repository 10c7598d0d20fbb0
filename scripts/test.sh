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

echo "== deno test (all tests, backend wgpu)"
MACE_BACKEND=wgpu "$DENO" test -A --junit-path="$results/wgpu.xml" tests/ "${filter[@]}"
wgpu_rc=$?

echo "== deno test (GPU tests, backend dawn on SwiftShader)"
mapfile -t gpu_tests < <(find tests -name '*.gpu.test.ts' | sort)
MACE_BACKEND=dawn VK_ICD_FILENAMES="$SWIFTSHADER_ICD" \
  "$DENO" test -A --junit-path="$results/dawn.xml" "${gpu_tests[@]}" "${filter[@]}"
dawn_rc=$?

"$DENO" run -A scripts/summarize-junit.ts "$results/wgpu.xml" "$results/dawn.xml"
summary_rc=$?
rm -rf "$results"
[ $wgpu_rc -eq 0 ] && [ $dawn_rc -eq 0 ] && [ $summary_rc -eq 0 ]
