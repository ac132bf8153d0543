#!/usr/bin/env bash
# Runs every check and test of tessera. This is exactly what CI (.ci/run) runs.
#   ./scripts/test.sh
cd "$(dirname "$0")/.."
source scripts/env.sh

# The bench tests drive a real etcd (tests/bench): Debian's etcd-server.
if ! command -v etcd >/dev/null 2>&1; then
  echo "installing etcd-server for the bench tests" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi

# The alert rules are checked with promtool (Debian's prometheus).
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus (promtool) to check the alert rules" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
fi

# The systemd unit is checked with systemd-analyze.
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "installing systemd (systemd-analyze) to check the unit" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq systemd >/dev/null
fi

# The status page is tested in headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium to test the status page" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets (every crate of the workspace)"
cargo clippy --workspace --all-targets --features tessera/failpoints --quiet -- -D warnings
# Without the feature too: code used only by fail-point tests must be gated like them.
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== alert rules (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
echo "== no import cycles between modules"
python3 scripts/module-deps.py
echo "== the client crate depends on neither RocksDB nor raft"
if cargo tree -p tessera-client -e normal,build --prefix none | grep -E '^(librocksdb-sys|rocksdb|raft|raft-proto) '; then
  echo "error: tessera-client depends on the server's storage or consensus (above)" >&2
  exit 1
fi
echo "== cargo build (tests and the tessera binary)"
cargo build --workspace --all-targets --features tessera/failpoints --quiet
echo "== the systemd unit (with the binary just built in ExecStart)"
unit_dir=$(mktemp -d)
sed "s|/usr/local/bin/tessera|$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/debug/tessera|" \
  deploy/systemd/tessera.service > "$unit_dir/tessera.service"
systemd-analyze verify "$unit_dir/tessera.service"
rm -rf "$unit_dir"
echo "== cargo test"
cargo test --workspace --all-targets --features tessera/failpoints --no-fail-fast
echo "== cargo test --doc (the examples in the API docs compile)"
cargo test --workspace --doc --features tessera/failpoints
echo "== all tests passed in $(( $(date +%s) - start ))s"
