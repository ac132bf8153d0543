# Shared by the bench scripts (sourced): a 3-node tessera cluster on loopback.
#
#   tessera_cluster BIN DIR BASE REGIONS [EXTRA_TOML]
# writes DIR/nodeN.toml (listening on 127.0.0.1:BASE+N, metrics on BASE+100+N, logs in DIR),
# starts the three servers, appends their pids to TESSERA_PIDS and sets TESSERA_EP.
#   tessera_wait_led BIN EP REGIONS
# waits (up to a minute) until every region, the placement region included, has a leader.
#   tls_certs DIR
# makes DIR/ca.pem and DIR/node.crt + node.key (for 127.0.0.1 and localhost, signed by the
# CA) with openssl, for TLS runs. TESSERA_CLI_ARGS (e.g. "--cacert DIR/ca.pem") is passed to
# the CLI calls here.
#   etcd_cluster DIR BASE TOKEN
# starts a 3-member etcd cluster (client ports BASE+1..3, peer ports BASE+11..13, fsync on
# as always in etcd), appends the pids to ETCD_PIDS and sets ETCD_EP.
#   etcd_wait_healthy EP
# waits (up to a minute) until every member answers.

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
    # shellcheck disable=SC2086
    n=$({ "$bin" regions --endpoints "$ep" ${TESSERA_CLI_ARGS:-} --json 2>/dev/null || true; } |
      { grep -o '"leader_node":[0-9]' || true; } | wc -l)
    [ "$n" -ge $((regions + 1)) ] && return 0
    sleep 0.5
  done
  echo "warning: not every region has a leader yet" >&2
}

tls_certs() {
  local d=$1
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=tessera-bench-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=node \
    -keyout "$d/node.key" -out "$d/node.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' \
    >"$d/node.ext"
  openssl x509 -req -in "$d/node.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/node.ext" -out "$d/node.crt" 2>/dev/null
}

ETCD_PIDS=()

etcd_cluster() {
  local dir=$1 base=$2 token=$3 peers="" i
  for i in 1 2 3; do peers+="e$i=http://127.0.0.1:$((base + 10 + i)),"; done
  peers=${peers%,}
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$dir/etcd$i" \
      --listen-client-urls "http://127.0.0.1:$((base + i))" \
      --advertise-client-urls "http://127.0.0.1:$((base + i))" \
      --listen-peer-urls "http://127.0.0.1:$((base + 10 + i))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((base + 10 + i))" \
      --initial-cluster "$peers" --initial-cluster-state new \
      --initial-cluster-token "$token" \
      --quota-backend-bytes 8589934592 >"$dir/etcd$i.log" 2>&1 &
    ETCD_PIDS+=($!)
  done
  ETCD_EP="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
}

etcd_wait_healthy() {
  for _ in $(seq 1 120); do
    ETCDCTL_API=3 etcdctl --endpoints "$1" endpoint health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "warning: etcd is not healthy yet" >&2
}
