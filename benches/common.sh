# Shared by the benchmark scripts (sourced, not run).

# Reads the options the on/off scripts share into backend, rounds, messages,
# peers, mix and keys; the caller sets their defaults first.
parse_load_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --backend) backend=$2; shift 2 ;;
      --rounds) rounds=$2; shift 2 ;;
      --messages) messages=$2; shift 2 ;;
      --peers) peers=$2; shift 2 ;;
      --mix) mix=$2; shift 2 ;;
      --keys) keys=$2; shift 2 ;;
      *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
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

# Points the agent's settings at a database in $work, or at a Redis server
# started here on a free port (its pid is added to the pids array), and at
# free loopback ports. Sets peer_port.
agent_env() { # $1 = local|redis
  export AGENT_STORAGE__BACKEND=$1
  export AGENT_STORAGE__LOCAL__PATH=$work/agent.db
  if [ "$1" = redis ]; then
    local rport
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$rport"
    export AGENT_STORAGE__REDIS__URL=redis://127.0.0.1:$rport/0
  fi
  peer_port=$(free_port)
  export AGENT_NETWORK__LISTEN=127.0.0.1:$peer_port
  export AGENT_METRICS__ADDRESS=127.0.0.1
  export AGENT_METRICS__PORT=$(free_port)
  export AGENT_LOG__LEVEL=warn
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
