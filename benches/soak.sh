#!/usr/bin/env bash
# Sustained load with metrics on: the agent's RSS must stay flat (histogram
# samples are drained by the exporter's upkeep, not accumulated).
#
#   benches/soak.sh [--seconds 300] [--interval 10] [--backend local]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=300 interval=10 backend=local
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bin agent --example loadgen
work=$(mktemp -d)
. benches/common.sh
peer_port=$(free_port)
AGENT_STORAGE__BACKEND=$backend AGENT_STORAGE__LOCAL__PATH=$work/agent.db \
AGENT_NETWORK__LISTEN=127.0.0.1:$peer_port AGENT_METRICS__ADDRESS=127.0.0.1 \
AGENT_METRICS__PORT=$(free_port) AGENT_LOG__LEVEL=warn \
  target/release/agent >"$work/agent.log" 2>&1 &
agent_pid=$!
load_pid=
trap 'kill $agent_pid ${load_pid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
wait_port "$peer_port"

( end=$((SECONDS + seconds))
  while [ $SECONDS -lt $end ]; do
    target/release/examples/loadgen --addr "127.0.0.1:$peer_port" --peers 8 --messages 200000 \
      --mix get=90,put=10,delete=0 >/dev/null || exit 1
  done ) &
load_pid=$!
echo "elapsed_s rss_kib"
start=$SECONDS
while kill -0 "$load_pid" 2>/dev/null; do
  echo "$((SECONDS - start)) $(awk '/VmRSS/ {print $2}' /proc/$agent_pid/status)"
  sleep "$interval"
done
wait "$load_pid"
echo "$((SECONDS - start)) $(awk '/VmRSS/ {print $2}' /proc/$agent_pid/status)"
