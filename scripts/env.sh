# Sourced by the run and test scripts: environment for the software GPU drivers.
# Mesa warns "XDG_RUNTIME_DIR is invalid" unless it points at a writable folder.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -w "${XDG_RUNTIME_DIR}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/mace-runtime-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
# Dawn uses Chromium's SwiftShader when no other Vulkan driver is requested.
SWIFTSHADER_ICD=/usr/lib/chromium/vk_swiftshader_icd.json
DENO="$(pwd)/node_modules/.bin/deno"
