#!/usr/bin/env bash
# tessera side by side with etcd on this machine, in one command:
#   benches/compare-etcd.sh [OUT_DIR]            (default: target-dir/compare-etcd/<time>)
# Starts a 3-member etcd cluster (Debian's etcd-server, installed if missing) and a 3-node
# tessera cluster on loopback — both fsync every write and keep 3 replicas — then runs every
# `tessera bench` workload against each in turn with the same load generator and settings.
# While one system is measured the other one's processes are paused (SIGSTOP), so they do
# not share the two cores. The workloads at 64 in flight and the single-client put run
# ROUNDS times, the two systems taking turns, so that a slow spell of the machine does not
# land on one system only; the report gives the median and the spread. Each run also records the server processes' CPU
# time (user + system, from /proc) per operation. Writes OUT_DIR/report.md (side-by-side
# table with ratios) and two SVG charts, and cleans up everything it started.
# Environment: DURATION (s per run, 10), KEYS (50000), REGIONS (tessera regions, 64),
#              PROFILE (release|debug, release), WORKLOADS, SWEEP (concurrency list),
#              ROUNDS (2), TESSERA_ARGS (more `tessera bench` flags for tessera's runs only,
#              e.g. `--unary` to measure without the client's multiplexed stream), BOTH_ARGS
#              (more flags for both, e.g. `--watchers 100 --rate 1000` for the watch workload).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benches/lib.sh

DURATION=${DURATION:-10}
KEYS=${KEYS:-50000}
REGIONS=${REGIONS:-64}
PROFILE=${PROFILE:-release}
WORKLOADS=${WORKLOADS:-"put get mixed scan cas metadata"}
SWEEP=${SWEEP:-"1 8 64 256"}
ROUNDS=${ROUNDS:-2}
OUT=${1:-$CARGO_TARGET_DIR/compare-etcd/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

if ! command -v etcd >/dev/null 2>&1; then
  echo "installing etcd-server (Debian package)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi
if [ "$PROFILE" = release ]; then cargo build --release --bin tessera -q; else cargo build --all-targets -q; fi
BIN="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/$PROFILE/tessera"

DIR=$(mktemp -d /tmp/tessera-vs-etcd.XXXXXX)
ETCD_PIDS=()
cleanup() {
  for p in "${ETCD_PIDS[@]:-}" "${TESSERA_PIDS[@]:-}"; do
    [ -n "$p" ] && { kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null; } || true
  done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

base=$(( 23000 + RANDOM % 2000 ))
# etcd: client ports base+1..3, peer ports base+11..13. fsync is always on in etcd.
etcd_cluster "$DIR" "$base" tessera-compare

# tessera: ports base+21..23 (metrics base+121..123), fsync on (the default made explicit),
# 3 replicas.
tessera_cluster "$BIN" "$DIR" "$((base + 20))" "$REGIONS" "replicas = 3
[storage]
sync_writes = true"
echo "waiting for both clusters..."
for _ in $(seq 1 120); do
  ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EP" endpoint health >/dev/null 2>&1 && break
  sleep 0.5
done
tessera_wait_led "$BIN" "$TESSERA_EP" "$REGIONS"

pause() { for p in "$@"; do kill -STOP "$p"; done; }
resume() { for p in "$@"; do kill -CONT "$p"; done; sleep 1; }
focus() { # target: pause the other system
  if [ "$1" = etcd ]; then resume "${ETCD_PIDS[@]}"; pause "${TESSERA_PIDS[@]}";
  else resume "${TESSERA_PIDS[@]}"; pause "${ETCD_PIDS[@]}"; fi
}

endpoints() { if [ "$1" = etcd ]; then echo "$ETCD_EP"; else echo "$TESSERA_EP"; fi; }
cpu_ticks() { # target → user + system clock ticks of its server processes so far
  local total=0 p pids
  if [ "$1" = etcd ]; then pids=("${ETCD_PIDS[@]}"); else pids=("${TESSERA_PIDS[@]}"); fi
  for p in "${pids[@]}"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}

# Every key the read workloads use is written once, outside any measured run.
preload() {
  echo "== $1 preload of $KEYS keys" >&2
  "$BIN" bench put --target "$1" --endpoints "$(endpoints "$1")" --concurrency 64 \
    --connections 4 --keys "$KEYS" --value-size 256 --ops "$KEYS" --warmup 0 \
    --distribution sequential >/dev/null
}

run() { # target workload concurrency round
  local target=$1 workload=$2 conc=$3 round=$4
  local name="$OUT/$target-$workload-c$conc-r$round" c0 c1 bench
  echo "== $target $workload concurrency $conc (round $round)" >&2
  "$BIN" bench "$workload" --target "$target" --endpoints "$(endpoints "$target")" \
    --concurrency "$conc" --connections 4 --keys "$KEYS" --value-size 256 \
    --duration "$DURATION" --warmup 2 --json "$name.json" ${BOTH_ARGS:-} \
    $([ "$target" = tessera ] && echo "${TESSERA_ARGS:-}") >"$name.txt" &
  bench=$!
  sleep 2 # the warm-up: CPU is counted over the measured part only
  c0=$(cpu_ticks "$target")
  wait "$bench"
  c1=$(cpu_ticks "$target")
  cat "$name.txt" | tee -a "$OUT/runs.txt"
  rm "$name.txt"
  echo "{\"cpu_seconds\": $(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}')}" >"$name.cpu"
}

for target in etcd tessera; do focus "$target"; preload "$target"; done
# The goals' figures (every workload at 64 in flight, single-client put latency) come from
# every round; the rest of the concurrency sweep runs once.
for round in $(seq 1 "$ROUNDS"); do
  for target in etcd tessera; do
    focus "$target"
    for w in $WORKLOADS; do run "$target" "$w" 64 "$round"; done
    if [[ " $SWEEP " == *" 1 "* ]]; then run "$target" put 1 "$round"; fi
  done
done
for target in etcd tessera; do
  focus "$target"
  for c in $SWEEP; do
    [ "$c" = 64 ] && continue
    [ "$c" = 1 ] || run "$target" put "$c" 1
    run "$target" get "$c" 1
  done
done
resume "${ETCD_PIDS[@]}"

python3 benches/compare-report.py "$OUT" "$REGIONS" > "$OUT/report.md"
echo "report: $OUT/report.md"
cat "$OUT/report.md"
