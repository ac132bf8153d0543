#!/usr/bin/env bash
# Starts a 3-node tessera cluster on loopback with the example configs
# (config/cluster-3/node{1,2,3}.toml: data and logs under ./tessera-data/cluster-3), writes and
# reads a few keys through the CLI to show it working, and leaves it running.
#   ./scripts/local-cluster.sh          start (or reuse) the cluster
#   ./scripts/local-cluster.sh stop     stop it (SIGTERM, graceful)
cd "$(dirname "$0")/.."
source scripts/env.sh
BIN="$TESSERA_BIN_DIR/tessera"
RUN=tessera-data/cluster-3
EP=127.0.0.1:20161,127.0.0.1:20162,127.0.0.1:20163

if [ "${1:-}" = stop ]; then
  pids=()
  for i in 1 2 3; do
    if [ -f "$RUN/node$i.pid" ]; then
      pid=$(cat "$RUN/node$i.pid")
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$RUN/node$i.pid"
  done
  # A graceful stop flushes the store: wait for it (up to 15 s), so the data directory is
  # complete, and free to delete, once this returns.
  for _ in $(seq 1 150); do
    alive=0
    for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  if [ "$alive" = 1 ]; then
    echo "a node is still shutting down after 15 s (see $RUN/node*.log)" >&2
    exit 1
  fi
  echo "stopped (data kept in $RUN; delete it for a fresh cluster)"
  exit 0
fi

# Cargo's own progress is shown: a first build compiles RocksDB's C++ sources for 10-15
# minutes, and a silent terminal would look hung.
echo "building tessera (the first build takes 10-15 minutes; later ones seconds)"
cargo build --all-targets
mkdir -p "$RUN"
for i in 1 2 3; do
  if [ -f "$RUN/node$i.pid" ] && kill -0 "$(cat "$RUN/node$i.pid")" 2>/dev/null; then
    continue
  fi
  nohup "$BIN" server --config "config/cluster-3/node$i.toml" >> "$RUN/node$i.out" 2>&1 &
  echo $! > "$RUN/node$i.pid"
done

# Healthy: every node up, every region led and in the routing table (docs/operations.md).
printf "waiting for the cluster to be healthy"
for _ in $(seq 1 120); do
  st=$("$BIN" status --endpoints "$EP" --json 2>/dev/null || true)
  case "$st" in *'"nodes_up":3,'*'"regions":65,'*'"health":"healthy"'*) break ;; esac
  printf "."; sleep 0.5
done
echo

set -x
"$BIN" kv --endpoints "$EP" put /nodes/broker-1 '{"addr":"10.0.0.1:9092"}'
"$BIN" kv --endpoints "$EP" put /nodes/broker-2 '{"addr":"10.0.0.2:9092"}'
"$BIN" kv --endpoints "$EP" cas /controller broker-1 --absent ||
  echo "(a controller was elected on an earlier run of this cluster)"
"$BIN" kv --endpoints "$EP" scan /nodes/ /nodes0
"$BIN" kv --endpoints "$EP" get /controller
{ set +x; } 2>/dev/null
"$BIN" regions --endpoints "$EP" | tail -3
"$BIN" nodes --endpoints "$EP"
"$BIN" status --endpoints "$EP"

cat <<MSG

tessera is running: 3 nodes, 64 user regions, the placement region and 2 lease regions.
  talk to it:   $BIN kv --endpoints $EP get|put|delete|scan|cas ...
                $BIN regions --endpoints $EP
                $BIN nodes --endpoints $EP
                $BIN status --endpoints $EP
  metrics:      curl http://127.0.0.1:20181/metrics
  logs:         $RUN/node{1,2,3}.log
  stop it:      ./scripts/local-cluster.sh stop
MSG
