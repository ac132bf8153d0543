#!/usr/bin/env bash
# Lease keep-alive figures for a 3-node cluster on loopback — tessera, or etcd with
# TARGET=etcd (Debian's etcd-server): starts the cluster, sets up SESSIONS sessions (a lease
# of TTL seconds and a registration key each) with `tessera bench lease`, then measures the
# servers' CPU over SECS seconds of keep-alives (renewed at TTL/3) and their memory before
# and after the set-up. Cleans up everything it started.
#
#   benches/lease-load.sh [SESSIONS] [TTL] [SECS]
# Environment: TARGET (tessera|etcd), PROFILE (debug|release), BIN (a tessera binary).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

SESSIONS=${1:-100000}
TTL=${2:-60}
SECS=${3:-20}
TARGET=${TARGET:-tessera}
PROFILE=${PROFILE:-release}
if [ -z "${BIN:-}" ]; then
  if [ "$PROFILE" = release ]; then cargo build --release --bin tessera -q; else cargo build --all-targets -q; fi
  BIN="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/$PROFILE/tessera"
fi
DIR=$(mktemp -d /tmp/tessera-lease.XXXXXX)
source benches/lib.sh
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}" "${TESSERA_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

base=$(( 23000 + RANDOM % 2000 ))
if [ "$TARGET" = etcd ]; then
  etcd_cluster "$DIR" "$base" tessera-lease
  PIDS=("${ETCD_PIDS[@]}")
  ETCD_PIDS=()
  EP=$ETCD_EP
  etcd_wait_healthy "$EP"
else
  tessera_cluster "$BIN" "$DIR" "$base" 4 ""
  PIDS=("${TESSERA_PIDS[@]}")
  TESSERA_PIDS=()
  EP=$TESSERA_EP
  tessera_wait_led "$BIN" "$EP" 6
fi
rss() { for p in "${PIDS[@]}"; do awk '/^VmRSS/ {printf "%d ", $2}' "/proc/$p/status"; done; }
cpu() { for p in "${PIDS[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }
sum() { awk '{for (i = 1; i <= NF; i++) s += $i} END {print s + 0}'; }
rss0=$(rss)
"$BIN" bench lease --target "$TARGET" --endpoints "$EP" --sessions "$SESSIONS" --ttl "$TTL" \
  --duration $((SECS + 4)) --warmup 2 --concurrency 256 --json "$DIR/bench.json" \
  >"$DIR/bench.out" 2>"$DIR/bench.err" &
bench=$!
until grep -q "set up in" "$DIR/bench.err" 2>/dev/null; do
  kill -0 $bench 2>/dev/null || { cat "$DIR/bench.err"; exit 1; }
  sleep 0.5
done
sed -n 's/^bench lease: //p' "$DIR/bench.err"
sleep 4 # the warm-up, and the first renewals spread over a third of the TTL settle
rss1=$(rss); c0=$(cpu); t0=$(date +%s.%N)
sleep "$SECS"
c1=$(cpu); t1=$(date +%s.%N)
wait $bench
cat "$DIR/bench.out"
ka=$(awk -v s="$SESSIONS" -v t="$TTL" 'BEGIN {printf "%.0f", s * 3 / t}')
hz=$(getconf CLK_TCK)
used=$(( $(echo "$c1" | sum) - $(echo "$c0" | sum) ))
echo "keep-alives due: $ka/s ($SESSIONS sessions, TTL $TTL s, renewed at TTL/3)"
awk -v u="$used" -v hz="$hz" -v a="$t0" -v b="$t1" -v k="$ka" 'BEGIN {
  s = b - a; c = u / hz
  printf "server CPU over %.1f s of keep-alives: %.2f s (3 nodes) = %.1f%% of a core per node, %.1f us per keep-alive\n",
         s, c, 100 * c / s / 3, 1e6 * c / (k * s)}'
echo "server RSS before / after the set-up (KB): $rss0/ $rss1"
awk -v a="$(echo "$rss0" | sum)" -v b="$(echo "$rss1" | sum)" -v n="$SESSIONS" \
  'BEGIN {printf "memory per live session: %.0f bytes (3 nodes together)\n", 1024 * (b - a) / n}'
