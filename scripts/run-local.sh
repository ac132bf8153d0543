#!/usr/bin/env bash
# Installs prerequisites, builds tessera and starts one node on the embedded default config.
#   ./scripts/run-local.sh            (Ctrl-C stops it)
# Extra arguments go to `tessera server` (e.g. --config config/cluster-3/node1.toml).
cd "$(dirname "$0")/.."
source scripts/env.sh

# --all-targets builds with the same dependency features as the tests, so one RocksDB build
# serves both (a plain `cargo build` resolves features differently and compiles it again).
cargo build --all-targets -q
exec "$CARGO_TARGET_DIR/debug/tessera" server "$@"
