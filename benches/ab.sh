#!/usr/bin/env bash
# Interleaved A/B comparison of two tessera builds (or two server environments) under the
# same load, for deciding whether a change helps. On this kind of shared 2-core machine one
# run's writes/s drift by ±15% from minute to minute, so runs alternate A, B, A, B, ... and
# the figures compared are medians of server CPU per operation, split by thread class.
#
#   benches/ab.sh A_BIN B_BIN [ROUNDS] [REGIONS] [WORKLOAD]
#
# A_BIN / B_BIN: tessera binaries (the same path twice to compare environments).
# Environment: A_ENV / B_ENV (command prefixes for each side's servers, e.g.
# `env TOKIO_WORKER_THREADS=1`), A_CONFIG / B_CONFIG (more node TOML for each side, as
# cluster-load.sh's EXTRA_CONFIG, e.g. "[storage]\ndata_memtable_mb = 64"), SECS (measured seconds per run, default 10), CONC
# (in-flight requests, default 64), EXTRA_BENCH_ARGS (passed to `tessera bench`), A_TLS /
# B_TLS (1: that side's cluster speaks TLS, as cluster-load.sh's TLS=1), A_AUTH / B_AUTH (1:
# authentication on too, the bench logged in as a user, as cluster-load.sh's AUTH=1).
# Each run is `benches/cluster-load.sh`, which starts and cleans up its own cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
A=$1
B=$2
ROUNDS=${3:-3}
REGIONS=${4:-64}
WORKLOAD=${5:-put}
SECS=${SECS:-10}
CONC=${CONC:-64}
for bin in "$A" "$B"; do
  [ -x "$bin" ] || { echo "ab.sh: not an executable: $bin" >&2; exit 2; }
done

OUT=$(mktemp -d /tmp/tessera-ab.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

# One run → "ops_per_s us_per_op worker_us tokio_us entries_per_fsync" on stdout.
run() {
  local bin=$1 env=$2 cfg=$3 log=$4 tls=$5 auth=$6
  AUTH="$auth" TLS="$tls" SERVER_ENV="$env" EXTRA_CONFIG="$cfg" BIN="$bin" benches/cluster-load.sh "$REGIONS" "$CONC" "$SECS" "$WORKLOAD" \
    >"$log" 2>&1 || { echo "ab.sh: run failed, see below" >&2; tail -20 "$log" >&2; exit 1; }
  awk '
    / ops in .* = [0-9]+ ops\/s$/ {ops = $(NF - 1)}
    /^server CPU \(3 nodes\)/ {for (i = 1; i <= NF; i++) if ($i == "us") us = $(i - 1)}
    /^server CPU by thread/ {w = $7; sub(",", "", w); k = $9; sub(",", "", k)}
    /entries per fsync/ {epf = $NF}
    /^latency ms: p50/ {p50 = $4}
    END {printf "%s %s %s %s %s %s\n", ops, us, w, k, epf, p50}' "$log"
}

echo "A = ${A_ENV:+$A_ENV }$A${A_CONFIG:+ with config $A_CONFIG}${A_TLS:+ (TLS=$A_TLS)}${A_AUTH:+ (AUTH=$A_AUTH)}"
echo "B = ${B_ENV:+$B_ENV }$B${B_CONFIG:+ with config $B_CONFIG}${B_TLS:+ (TLS=$B_TLS)}${B_AUTH:+ (AUTH=$B_AUTH)}"
echo "$ROUNDS rounds of: cluster-load.sh $REGIONS $CONC $SECS $WORKLOAD"
row() { printf '%-6s %10s %12s %12s %12s %10s %8s\n' "$@"; }
row run "ops/s" "us/op" "worker us" "tokio us" "ent/fsync" "p50 ms"
for r in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    if [ $side = A ]; then bin=$A env=${A_ENV:-} cfg=${A_CONFIG:-} tls=${A_TLS:-0} auth=${A_AUTH:-0}; else bin=$B env=${B_ENV:-} cfg=${B_CONFIG:-} tls=${B_TLS:-0} auth=${B_AUTH:-0}; fi
    line=$(run "$bin" "$env" "$cfg" "$OUT/$side$r.log" "$tls" "$auth")
    echo "$line" >>"$OUT/$side"
    # shellcheck disable=SC2086
    row "$side$r" $line
  done
done

median() { # column → median of that column of a side's file
  sort -g -k"$2" "$1" | awk -v c="$2" '{v[NR] = $c} END {
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
echo
row median "ops/s" "us/op" "worker us" "tokio us" "ent/fsync" "p50 ms"
for side in A B; do
  row "$side" $(for c in 1 2 3 4 5 6; do median "$OUT/$side" $c; done)
done
awk 'FNR == 1 {f++} {us[f] += $2; n[f]++} END {
  if (n[1] && n[2]) printf "B / A, mean server CPU per operation: %.3f\n", (us[2] / n[2]) / (us[1] / n[1])}' \
  "$OUT/A" "$OUT/B"
