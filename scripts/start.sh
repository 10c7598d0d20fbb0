#!/usr/bin/env bash
# Sets up (if needed) and runs mace's main job with the bundled model.
# Until the HTTP service lands this is `mace generate`; extra args are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$DENO" run -A src/cli/mace.ts generate "$@"
