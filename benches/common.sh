# Shared by the benchmark scripts (sourced, not run).

# Reads `--name value` options into variables of the same name (dashes
# become underscores: --max-ratio sets max_ratio). $1 lists the names the
# calling script takes, separated by spaces; any other option, or one
# without a value, stops the script with exit code 2. The caller sets the
# defaults first.
parse_args() { # $1 = "backend rounds ..." then the script's arguments
  local allowed=" $1 " name
  shift
  while [ $# -gt 0 ]; do
    name=${1#--}
    if [ "$name" = "$1" ] || [[ "$allowed" != *" $name "* ]]; then
      echo "unknown argument: $1" >&2
      exit 2
    fi
    [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
    printf -v "${name//-/_}" '%s' "$2"
    shift 2
  done
}

# The on/off measurement: $rounds rounds, each running "$1 ROUND true" (on)
# and "$1 ROUND false" (off). Odd rounds run on first, even rounds off first,
# so drift during the run (page cache, thermal, other load) falls on both.
alternate_rounds() { # $1 = the function measuring one run
  local round on order
  for round in $(seq 1 "$rounds"); do
    if [ $((round % 2)) -eq 1 ]; then order="true false"; else order="false true"; fi
    for on in $order; do
      "$1" "$round" "$on"
    done
  done
}

# A loopback port that was free a moment ago.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 15 s for a listener on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  return 1
}

# A scratch directory ($work) and the processes to stop (pids), both cleaned
# up when the script exits.
scratch() {
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
}

# Builds the release agent and the load generator; sets agent_bin and
# loadgen_bin. BENCH_AGENT_BIN, when set, names another agent binary to measure
# (an earlier build, for before/after figures from one run).
build_release() {
  cargo build --release --quiet --bin agent --example loadgen
  agent_bin=${BENCH_AGENT_BIN:-target/release/agent}
  loadgen_bin=target/release/examples/loadgen
}

# Points the agent's settings at a database in $work, at a Redis server
# started here on a free port, or at a Redis Cluster of 3 masters and 3
# replicas started here (start_redis_cluster), and at free loopback ports.
# Started servers' pids are added to the pids array. Sets peer_port.
agent_env() { # $1 = local|redis|redis_cluster
  export AGENT_STORAGE__BACKEND=$1
  export AGENT_STORAGE__LOCAL__PATH=$work/agent.db
  if [ "$1" = redis ]; then
    local rport
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$rport"
    export AGENT_STORAGE__REDIS__URL=redis://127.0.0.1:$rport/0
  elif [ "$1" = redis_cluster ]; then
    start_redis_cluster
  fi
  peer_port=$(free_port)
  export AGENT_NETWORK__LISTEN=127.0.0.1:$peer_port
  export AGENT_METRICS__ADDRESS=127.0.0.1
  export AGENT_METRICS__PORT=$(free_port)
  export AGENT_LOG__LEVEL=warn
}

# Six redis-servers in cluster mode on free ports (each with a free cluster
# bus port too), joined by redis-cli into 3 masters with one replica each,
# as tests/common/cluster.rs does. Waits until every node reports
# cluster_state:ok, then sets AGENT_STORAGE__REDIS_CLUSTER__NODES.
start_redis_cluster() {
  local i port bus addrs=() urls=()
  for i in 1 2 3 4 5 6; do
    port=$(free_port) bus=$(free_port)
    mkdir -p "$work/cluster/$i"
    (cd "$work/cluster/$i" && exec redis-server --port "$port" --cluster-port "$bus" --bind 127.0.0.1 \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --save "" --appendonly no --repl-diskless-sync-delay 0) >"$work/cluster/$i/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$port"
    addrs+=("127.0.0.1:$port")
    urls+=("redis://127.0.0.1:$port")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$work/cluster/create.log" 2>&1
  for i in $(seq 1 300); do
    local ok=0
    for a in "${addrs[@]}"; do
      redis-cli -h 127.0.0.1 -p "${a##*:}" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
    done
    [ "$ok" -eq 6 ] && break
    sleep 0.1
  done
  [ "$ok" -eq 6 ] || { echo "the Redis Cluster did not become healthy" >&2; cat "$work/cluster/create.log" >&2; return 1; }
  local IFS=,
  export AGENT_STORAGE__REDIS_CLUSTER__NODES="[${urls[*]}]"
}

# Puts each of $1 keys once, through an agent started for it, so gets hit.
preload() {
  echo "preloading $1 keys ($AGENT_STORAGE__BACKEND backend)"
  AGENT_METRICS__ENABLED=false "$agent_bin" >"$work/preload.log" 2>&1 &
  local pid=$!
  wait_port "$peer_port"
  "$loadgen_bin" --addr "127.0.0.1:$peer_port" --messages 1 --keys "$1" --preload >/dev/null
  kill -TERM "$pid"
  wait "$pid" || true
}

# An awk function for the median of a[1..n] (sorts a in place).
AWK_MEDIAN='
  function median(a, n,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }'
