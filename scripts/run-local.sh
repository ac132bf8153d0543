#!/usr/bin/env bash
# Installs prerequisites, builds tessera and starts it on the embedded default config.
#   ./scripts/run-local.sh
cd "$(dirname "$0")/.."
source scripts/env.sh

cargo build --release --bin tessera
BIN="$CARGO_TARGET_DIR/release/tessera"
exec "$BIN" server "$@"
