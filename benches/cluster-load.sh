#!/usr/bin/env bash
# Load figures for a 3-node tessera cluster on loopback: starts the cluster (64 regions by
# default), runs `tessera bench`, and reads fsync and entry counters from every node's
# Prometheus endpoint to report entries per fsync. Cleans up everything it started.
#
#   benches/cluster-load.sh [REGIONS] [CONCURRENCY] [SECONDS] [WORKLOAD]
# Environment: WORKERS (raft workers per node, default 1), PROFILE (debug|release),
# EXTRA_BENCH_ARGS (more `tessera bench` flags), SERVER_ENV (a command prefix for the servers,
# e.g. `env TOKIO_WORKER_THREADS=1`), BIN (a tessera binary to use instead of
# building one — for A/B runs of two builds), EXTRA_CONFIG (more node TOML, e.g.
# "[storage]\nsync_writes = false"), LEADERS_ON (a node id: move every region's leader there
# before the run, as one region has all its leaders on one node; turns off the scheduler),
# PRELOAD=1 (write every key once before a put or cas run too, as reads always do), TLS=1
# (the nodes speak TLS and mutual TLS with certificates made by openssl for the run; the
# CLI and the bench trust their CA), AUTH=1 (with TLS=1: authentication on, the bench logged
# in as a user whose role may read and write every key).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

REGIONS=${1:-64}
CONC=${2:-64}
SECS=${3:-20}
WORKLOAD=${4:-put}
PROFILE=${PROFILE:-debug}

# --all-targets: the same feature set as the test build, so RocksDB is not compiled again.
if [ -z "${BIN:-}" ]; then
  if [ "$PROFILE" = release ]; then cargo build --release --bin tessera -q; else cargo build --all-targets -q; fi
  BIN="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/$PROFILE/tessera"
fi
DIR=$(mktemp -d /tmp/tessera-load.XXXXXX)
source benches/lib.sh
cleanup() {
  for p in "${TESSERA_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

base=$(( 21000 + RANDOM % 2000 ))
extra="[raft]
workers = ${WORKERS:-1}
$(printf '%b' "${EXTRA_CONFIG:-}")"
TESSERA_CLI_ARGS=""
if [ "${TLS:-0}" = 1 ]; then
  tls_certs "$DIR/certs"
  extra+="
[security]
cert_file = \"$DIR/certs/node.crt\"
key_file = \"$DIR/certs/node.key\"
ca_file = \"$DIR/certs/ca.pem\""
  TESSERA_CLI_ARGS="--cacert $DIR/certs/ca.pem"
fi
if [ -n "${LEADERS_ON:-}" ]; then
  # The leader balancer would move them back.
  extra+="
[placement]
schedule = false"
fi
tessera_cluster "$BIN" "$DIR" "$base" "$REGIONS" "$extra"
EP=$TESSERA_EP
tessera_wait_led "$BIN" "$EP" "$REGIONS"
echo "cluster up: $REGIONS regions with leaders"
if [ -n "${LEADERS_ON:-}" ]; then
  moved=0
  for r in $("$BIN" regions --endpoints "$EP" $TESSERA_CLI_ARGS --json |
    grep -o '"id":[0-9]*,[^}]*"leader_node":[0-9]*' |
    awk -F'[:,]' -v n="$LEADERS_ON" '$NF != n {print $2}'); do
    "$BIN" regions --endpoints "$EP" $TESSERA_CLI_ARGS transfer-leader "$r" "$LEADERS_ON" >/dev/null && moved=$((moved + 1))
  done
  echo "moved $moved leaders to node $LEADERS_ON"
fi
if [ "${AUTH:-0}" = 1 ]; then
  [ "${TLS:-0}" = 1 ] || { echo "AUTH=1 needs TLS=1" >&2; exit 2; }
  admin() { "$BIN" "$@" --endpoints "$EP" $TESSERA_CLI_ARGS --cert "$DIR/certs/node.crt" --key "$DIR/certs/node.key" >/dev/null; }
  admin user add root:bench-root-pw
  admin user grant-role root root
  admin role add bench
  admin role grant-permission bench readwrite "" --from-key
  admin user add bench:bench-pw
  admin user grant-role bench bench
  admin auth enable
  sleep 2 # every node reads the switch within its refresh interval (1 s)
  TESSERA_CLI_ARGS+=" --user bench:bench-pw"
  echo "authentication on; the bench logs in as user bench"
fi

metric_sum() { # name → sum over nodes of the metric's value(s)
  local total=0
  for i in 1 2 3; do
    v=$(curl -s "http://127.0.0.1:$((base + 100 + i))/metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {printf "%d", s}')
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
thread_ticks_each() { # "pid/tid:comm ticks" of every server thread so far
  local p t
  for p in "${TESSERA_PIDS[@]}"; do
    for t in /proc/"$p"/task/*; do
      echo "$p/${t##*/}:$(tr -d ' ' < "$t/comm" 2>/dev/null) $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null)"
    done
  done
}
thread_kinds() { # a thread_ticks_each file → ticks of raft workers, tokio threads, the rest
  awk '{c = $1; sub(/^[^:]*:/, "", c)} c ~ /^raft-worker/ {w += $2; next} c ~ /^tokio/ {k += $2; next} {o += $2}
       END {printf "%d %d %d", w, k, o}' "$1"
}
node_cpu_each() { # user + system clock ticks of each server so far, in node order
  local p
  for p in "${TESSERA_PIDS[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done
}
case "${PRELOAD:-0}:$WORKLOAD" in
  1:* | *:get | *:mixed | *:scan)
    echo "preloading 100000 keys"
    "$BIN" bench put --endpoints "$EP" $TESSERA_CLI_ARGS --concurrency 64 --ops 100000 --warmup 0 \
      --distribution sequential --value-size 256 --keys 100000 >/dev/null
    ;;
esac
f0=$(metric_sum tessera_fsyncs_total); e0=$(metric_sum tessera_raft_entries_persisted_total)
m0=$(metric_sum tessera_transport_batch_messages_sum); b0=$(metric_sum tessera_transport_batch_messages_count)
r0=$(metric_sum tessera_worker_round_seconds_count)
/usr/bin/time -f "%U %S" -o "$DIR/bench.time" \
  "$BIN" bench "$WORKLOAD" --endpoints "$EP" $TESSERA_CLI_ARGS --concurrency "$CONC" --duration "$SECS" --warmup 2 \
  --value-size 256 --keys 100000 --json "$DIR/bench.json" ${EXTRA_BENCH_ARGS:-} &
bench=$!
sleep 2 # the warm-up: CPU is counted over the measured part only
n0=$(node_cpu_each); thread_ticks_each > "$DIR/threads0"
wait $bench
n1=$(node_cpu_each); thread_ticks_each > "$DIR/threads1"
c0=$(echo "$n0" | awk '{for (i = 1; i <= NF; i++) s += $i} END {print s}')
c1=$(echo "$n1" | awk '{for (i = 1; i <= NF; i++) s += $i} END {print s}')
t0=$(thread_kinds "$DIR/threads0"); t1=$(thread_kinds "$DIR/threads1")
f1=$(metric_sum tessera_fsyncs_total); e1=$(metric_sum tessera_raft_entries_persisted_total)
m1=$(metric_sum tessera_transport_batch_messages_sum); b1=$(metric_sum tessera_transport_batch_messages_count)
r1=$(metric_sum tessera_worker_round_seconds_count)
fs=$((f1 - f0)); es=$((e1 - e0))
# CPU per operation is steadier than operations/s on a shared, saturated machine: it does not
# depend on how the cores were shared with the load generator.
ops=$(grep -o '"ops":[0-9]*' "$DIR/bench.json" | head -1 | cut -d: -f2)
echo "server CPU (3 nodes): $(awk -v t=$((c1 - c0)) -v n="${ops:-0}" -v hz="$(getconf CLK_TCK)" \
  'BEGIN {if (n > 0) printf "%.1f s, %.1f us per operation", t / hz, 1e6 * t / hz / n; else print "n/a"}')"
# Threads that exited during the run (none normally) are missing from the split.
echo "server CPU by thread: $(awk -v a="$t0" -v b="$t1" -v n="${ops:-0}" -v hz="$(getconf CLK_TCK)" \
  'BEGIN {split(a, x, " "); split(b, y, " "); if (n == 0) {print "n/a"; exit}
          f = 1e6 / hz / n
          printf "raft workers %.1f, tokio %.1f, other %.1f us per operation",
                 (y[1] - x[1]) * f, (y[2] - x[2]) * f, (y[3] - x[3]) * f}')"
# Per node: with a node per machine, the busiest node's CPU per operation bounds throughput.
echo "server CPU by node: $(awk -v a="$n0" -v b="$n1" -v n="${ops:-0}" -v hz="$(getconf CLK_TCK)" \
  'BEGIN {k = split(a, x, " "); split(b, y, " "); if (n == 0) {print "n/a"; exit}
          for (i = 1; i <= k; i++) {v = (y[i] - x[i]) * 1e6 / hz / n; printf "%s%.1f", (i > 1 ? " / " : ""), v; if (v > m) m = v}
          printf " us per operation (busiest %.1f)", m}')"
# The busiest single thread bounds throughput however many cores each node gets.
echo "busiest server thread: $(awk -v n="${ops:-0}" -v hz="$(getconf CLK_TCK)" \
  'NR == FNR {a[$1] = $2; next} {d = $2 - a[$1]; if (d > m) {m = d; w = $1}}
   END {if (n > 0) printf "%s %.1f us per operation", w, m * 1e6 / hz / n; else print "n/a"}' \
  "$DIR/threads0" "$DIR/threads1")"
# The load generator shares the cores: its CPU per operation is what the servers did not get.
echo "load generator CPU: $(awk -v n="${ops:-0}" 'NR == 1 && n > 0 {printf "%.1f us per operation (warm-up included)", 1e6 * ($1 + $2) / n}' "$DIR/bench.time")"
echo "server RSS after the run: $(for p in "${TESSERA_PIDS[@]}"; do
  awk '/^VmRSS/ {printf "%d MB ", $2 / 1024}' "/proc/$p/status" 2>/dev/null; done)"
echo "fsyncs (3 nodes): $fs  raft entries persisted: $es  entries per fsync: $(awk -v e=$es -v f=$fs 'BEGIN {if (f > 0) printf "%.1f", e / f; else print "n/a"}')"
# Raft messages between the nodes, and how many each transport batch (one stream write) carried.
echo "raft messages (3 nodes): $(awk -v m=$((m1 - m0)) -v b=$((b1 - b0)) -v n="${ops:-0}" \
  'BEGIN {if (n > 0 && b > 0) printf "%.2f per operation, %.1f per transport batch", m / n, m / b; else print "n/a"}')"
# Worker rounds (each ends in one log write) and the transport batches each round caused.
echo "worker rounds (3 nodes): $(awk -v r=$((r1 - r0)) -v b=$((b1 - b0)) -v n="${ops:-0}" \
  'BEGIN {if (n > 0 && r > 0) printf "%.2f per operation, %.2f transport batches per round", r / n, b / r; else print "n/a"}')"
