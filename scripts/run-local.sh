#!/usr/bin/env bash
# Installs prerequisites, builds tessera and starts one node on the embedded default config.
#   ./scripts/run-local.sh            (Ctrl-C stops it)
# Extra arguments go to `tessera server` (e.g. --config config/cluster-3/node1.toml).
cd "$(dirname "$0")/.."
source scripts/env.sh

cargo build --all-targets -q
exec "$TESSERA_BIN_DIR/tessera" server "$@"
