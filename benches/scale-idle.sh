#!/usr/bin/env bash
# Many regions, no traffic: start-up time until every region has a leader, then idle CPU and
# resident memory of each node over 30 s. For the "idle regions cost nothing" figures.
#   benches/scale-idle.sh [REGIONS]        (default 10000; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
REGIONS=${1:-10000}
# Seconds to wait after every region is led before measuring (start-up reports, RocksDB
# flushes and compactions settle).
SETTLE=${SETTLE:-60}
cargo build --release --bin tessera -q
BIN="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/release/tessera"
DIR=$(mktemp -d /tmp/tessera-scale.XXXXXX)
source benches/lib.sh
cleanup() {
  for p in "${TESSERA_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
base=$(( 26000 + RANDOM % 2000 ))
t0=$(date +%s%N)
tessera_cluster "$BIN" "$DIR" "$base" "$REGIONS"
EP=$TESSERA_EP
PIDS=("${TESSERA_PIDS[@]}")
total=0
for _ in $(seq 1 600); do
  # Led regions as each node reports them in its heartbeat.
  total=$({ "$BIN" nodes -e "$EP" --json 2>/dev/null || true; } | { grep -o '"leaders":[0-9]*' || true; } |
    cut -d: -f2 | awk '{s += $1} END {print s + 0}')
  [ "$total" -ge $((REGIONS + 1)) ] && break
  sleep 1
done
t1=$(date +%s%N)
echo "$REGIONS user regions + placement on 3 nodes: every region led after $(( (t1 - t0) / 1000000 )) ms (leaders reported: $total)"
sleep "$SETTLE"
declare -A c0
for p in "${PIDS[@]}"; do c0[$p]=$(awk '{print $14 + $15}' "/proc/$p/stat"); done
sleep 30
hz=$(getconf CLK_TCK)
for p in "${PIDS[@]}"; do
  c1=$(awk '{print $14 + $15}' "/proc/$p/stat")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
  awk -v d=$((c1 - c0[$p])) -v hz="$hz" -v rss="$rss" -v n="$REGIONS" -v pid="$p" 'BEGIN {
    printf "node pid %s: idle CPU %.1f%% of one core, RSS %.1f MiB (%.1f KiB per region, before subtracting the base)\n",
      pid, 100 * d / hz / 30, rss / 1024, rss / (n + 1) }'
done
