#!/usr/bin/env bash
# A hot region splitting under write load. The same put workload (64 in flight, uniform over
# 100,000 keys, all in ONE starting region) runs twice on a fresh 3-node cluster: once with
# size splits on (region.max_keys = MAX_KEYS, so the region splits again and again while the
# load runs) and once with them off. Prints throughput, p99, errors and client retries of
# each, and how many regions the table ends with. Cleans up everything it started.
#   benches/split-load.sh [MAX_KEYS] [SECONDS]     (default 10000, 20)
# Environment: PROFILE (release|debug, default release).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
MAX_KEYS=${1:-10000}
SECS=${2:-20}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release --bin tessera -q; else cargo build --all-targets -q; fi
BIN="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/$PROFILE/tessera"
source benches/lib.sh
DIRS=()
cleanup() {
  for p in "${TESSERA_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for d in "${DIRS[@]:-}"; do rm -rf "$d"; done
}
trap cleanup EXIT

run() { # label max_keys
  local label=$1 max=$2 dir base
  dir=$(mktemp -d /tmp/tessera-split.XXXXXX)
  DIRS+=("$dir")
  base=$(( 24000 + RANDOM % 2000 ))
  TESSERA_PIDS=()
  # One user region to start with; the size check runs every second.
  tessera_cluster "$BIN" "$dir" "$base" 1 "[region]
max_keys = $max
[placement]
region_report_interval_ms = 1000"
  tessera_wait_led "$BIN" "$TESSERA_EP" 1
  "$BIN" bench put --endpoints "$TESSERA_EP" --concurrency 64 --keys 100000 \
    --duration "$SECS" --json "$dir/out.json" > "$dir/bench.out" 2>&1
  sleep 2
  local regions
  regions=$({ "$BIN" regions --endpoints "$TESSERA_EP" --json || true; } | grep -o '"start":' | wc -l)
  python3 - "$dir/out.json" "$label" "$regions" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
errors = sum(r["errors"].values())
print(f"{sys.argv[2]:<22} {r['ops_per_sec']:>9.0f} ops/s  p50 {r['p50_ms']:.2f} ms  "
      f"p99 {r['p99_ms']:.2f} ms  p99.9 {r['p999_ms']:.2f} ms  max {r['max_ms']:.1f} ms  "
      f"errors {errors}  retries {r['retries']}  regions at the end {sys.argv[3]}")
PY
  for p in "${TESSERA_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

run "splits on (max $MAX_KEYS)" "$MAX_KEYS"
run "splits off" 0
