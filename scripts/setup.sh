#!/usr/bin/env bash
# Installs what mace needs on a fresh Debian machine, idempotently:
#  - npm packages from package-lock.json when node_modules is missing or stale. `npm install`
#    rather than `npm ci`: the lock holds only this platform's Deno binary (the registry
#    mirror lacks the others), which `npm ci` rejects as out of sync; `npm install` installs
#    exactly the locked versions and leaves the lock unchanged;
#  - a Vulkan driver: Mesa's lavapipe (mesa-vulkan-drivers) and Chromium's SwiftShader
#    (chromium), software GPUs used when no hardware driver is present, and by the tests.
# Usage: scripts/setup.sh [--tests]   (--tests: require both software drivers)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm packages (npm install from package-lock.json)" >&2
  npm install --no-audit --no-fund --loglevel=error >&2
fi

LAVAPIPE_ICD=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -1 || true)
SWIFTSHADER_ICD=/usr/lib/chromium/vk_swiftshader_icd.json
ANY_ICD=$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | head -1 || true)

missing=()
if [ "${1:-}" = "--tests" ]; then
  [ -n "$LAVAPIPE_ICD" ] || missing+=(mesa-vulkan-drivers)
  [ -f "$SWIFTSHADER_ICD" ] || missing+=(chromium)
elif [ -z "$ANY_ICD" ]; then
  missing+=(mesa-vulkan-drivers)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "setup: no Vulkan driver found. Run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
