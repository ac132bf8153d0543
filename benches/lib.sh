# Shared by the bench scripts (sourced): a 3-node tessera cluster on loopback.
#
#   tessera_cluster BIN DIR BASE REGIONS [EXTRA_TOML]
# writes DIR/nodeN.toml (listening on 127.0.0.1:BASE+N, metrics on BASE+100+N, logs in DIR),
# starts the three servers, appends their pids to TESSERA_PIDS and sets TESSERA_EP.
#   tessera_wait_led BIN EP REGIONS
# waits (up to a minute) until every region, the placement region included, has a leader.

TESSERA_PIDS=()

tessera_cluster() {
  local bin=$1 dir=$2 base=$3 regions=$4 extra=${5:-} cluster="" i
  for i in 1 2 3; do cluster+="\"$i@127.0.0.1:$((base + i))\","; done
  cluster="[${cluster%,}]"
  for i in 1 2 3; do
    cat > "$dir/node$i.toml" <<TOML
[node]
id = $i
data_dir = "$dir/node$i"
listen_addr = "127.0.0.1:$((base + i))"
metrics_addr = "127.0.0.1:$((base + 100 + i))"
[cluster]
initial_cluster = $cluster
initial_regions = $regions
$extra
[log]
level = "warn"
file = "$dir/node$i.log"
TOML
    ${SERVER_ENV:-} "$bin" server --config "$dir/node$i.toml" 2>>"$dir/node$i.err" &
    TESSERA_PIDS+=($!)
  done
  TESSERA_EP="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
}

tessera_wait_led() {
  local bin=$1 ep=$2 regions=$3 n
  for _ in $(seq 1 120); do
    n=$({ "$bin" regions --endpoints "$ep" --json 2>/dev/null || true; } |
      { grep -o '"leader_node":[0-9]' || true; } | wc -l)
    [ "$n" -ge $((regions + 1)) ] && return 0
    sleep 0.5
  done
  echo "warning: not every region has a leader yet" >&2
}
