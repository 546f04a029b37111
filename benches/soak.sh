#!/usr/bin/env bash
# Sustained load with metrics on: the agent's RSS must stay flat (histograms
# are fixed arrays of bucket counts; nothing is kept per sample).
#
#   benches/soak.sh [--seconds 300] [--interval 10] [--backend local]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=300 interval=10 backend=local
. benches/common.sh
parse_args "seconds interval backend" "$@"
build_release
scratch
agent_env "$backend"
"$agent_bin" >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
wait_port "$peer_port"

( end=$((SECONDS + seconds))
  while [ $SECONDS -lt $end ]; do
    "$loadgen_bin" --addr "127.0.0.1:$peer_port" --peers 8 --messages 200000 \
      --mix get=90,put=10,delete=0 >/dev/null || exit 1
  done ) &
load_pid=$!
pids+=("$load_pid")
echo "elapsed_s rss_kib"
start=$SECONDS
while kill -0 "$load_pid" 2>/dev/null; do
  echo "$((SECONDS - start)) $(awk '/VmRSS/ {print $2}' /proc/$agent_pid/status)"
  sleep "$interval"
done
wait "$load_pid"
echo "$((SECONDS - start)) $(awk '/VmRSS/ {print $2}' /proc/$agent_pid/status)"
