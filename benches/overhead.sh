#!/usr/bin/env bash
# Metrics on versus off, end to end: runs the release agent alternately with
# metrics enabled and disabled on the same data, saturates it with the load
# generator, and prints the median ratios (on / off) of throughput and of the
# agent's CPU time per message (utime+stime from /proc/<pid>/stat). Per round
# it also prints the kernel's share of that CPU time, the context switches of
# all the agent's threads and its minor page faults per message, and its RSS
# after the load: the kernel-side costs that instruction counts
# (benches/callgrind.sh) do not see.
#
#   benches/overhead.sh [--backend local|redis|redis_cluster] [--rounds 5] [--messages 1000000]
#                       [--peers 16] [--mix get=90,put=10,delete=0] [--keys 10000]
#                       [--depth 64]
#
# --depth is each peer's requests in flight: the default saturates the agent
# (throughput, and latency with queueing); --depth 1 gives the round trip of
# a peer that waits for each reply.
#
# With taskset available the agent is pinned to CPU 0 and the load generator
# to CPU 1, so they do not steal each other's core and the agent saturates.
set -euo pipefail
cd "$(dirname "$0")/.."

# depth 64 is the load generator's own default.
backend=local rounds=5 messages=1000000 peers=16 mix="get=90,put=10,delete=0" keys=10000 depth=64
. benches/common.sh
parse_args "backend rounds messages peers mix keys depth" "$@"

build_release
scratch

pin_agent=() pin_load=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  pin_agent=(taskset -c 0) pin_load=(taskset -c 1)
fi

agent_env "$backend"
tck=$(getconf CLK_TCK)

start_agent() { # $1 = true|false (metrics)
  AGENT_METRICS__ENABLED=$1 "${pin_agent[@]}" "$agent_bin" >"$work/agent.log" 2>&1 &
  agent_pid=$!
  pids+=("$agent_pid")
  wait_port "$peer_port"
}
stop_agent() { kill -TERM "$agent_pid"; wait "$agent_pid" || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
minor_faults() { awk '{print $10}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Context switches of every thread of the agent (voluntary + involuntary).
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { n += $2 } END { print n + 0 }'; }

preload "$keys"

results=$work/results
: >"$results"
# One run: metrics $2 (true|false) in round $1.
measure() {
  local round=$1 on=$2
  start_agent "$on"
  before=$(cpu_ticks "$agent_pid") sys_before=$(sys_ticks "$agent_pid") cs_before=$(ctx_switches "$agent_pid") mf_before=$(minor_faults "$agent_pid")
  out=$("${pin_load[@]}" "$loadgen_bin" --addr "127.0.0.1:$peer_port" --peers "$peers" --depth "$depth" \
        --messages "$messages" --mix "$mix" --keys "$keys")
  after=$(cpu_ticks "$agent_pid") sys_after=$(sys_ticks "$agent_pid") cs_after=$(ctx_switches "$agent_pid") mf_after=$(minor_faults "$agent_pid") rss=$(rss_kib "$agent_pid")
  stop_agent
  line=$(grep '^RESULT' <<<"$out")
  rate=$(sed -E 's/.* rate=([0-9.]+).*/\1/' <<<"$line")
  n=$(sed -E 's/.* messages=([0-9]+).*/\1/' <<<"$line")
  errs=$(sed -E 's/.* errors=([0-9]+).*/\1/' <<<"$line")
  p99=$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$line")
  per_msg() { awk -v t="$1" -v hz="$tck" -v n="$n" 'BEGIN { printf "%.1f", t / hz * 1e9 / n }'; }
  ns_per_msg=$(per_msg $((after - before)))
  sys_ns_per_msg=$(per_msg $((sys_after - sys_before)))
  cs_per_msg=$(awk -v c=$((cs_after - cs_before)) -v n="$n" 'BEGIN { printf "%.3f", c / n }')
  mf_per_kmsg=$(awk -v c=$((mf_after - mf_before)) -v n="$n" 'BEGIN { printf "%.2f", c * 1000 / n }')
  echo "round $round metrics=$on rate=$rate msg/s cpu=${ns_per_msg} ns/msg (kernel ${sys_ns_per_msg}) ctxsw=${cs_per_msg}/msg faults=${mf_per_kmsg}/1k msg rss=$((rss / 1024)) MiB p99=${p99} us errors=$errs"
  echo "$round $on $rate $ns_per_msg $cs_per_msg $sys_ns_per_msg" >>"$results"
}
alternate_rounds measure

awk '
  { key = $1; if ($2 == "true") { on_rate[key] = $3; on_cpu[key] = $4; on_cs[key] = $5; on_sys[key] = $6 } else { off_rate[key] = $3; off_cpu[key] = $4; off_cs[key] = $5; off_sys[key] = $6 } }
  END {
    n = 0
    for (k in on_rate) { n++; tr[n] = on_rate[k] / off_rate[k]; cr[n] = on_cpu[k] / off_cpu[k]; ron[n] = on_rate[k]; roff[n] = off_rate[k]; con[n] = on_cpu[k]; coff[n] = off_cpu[k]; son[n] = on_cs[k]; soff[n] = off_cs[k]; kon[n] = on_sys[k]; koff[n] = off_sys[k] }
    printf "median throughput metrics on:  %.0f msg/s\n", median(ron, n)
    printf "median throughput metrics off: %.0f msg/s\n", median(roff, n)
    printf "median cpu per message on:  %.1f ns\n", median(con, n)
    printf "median cpu per message off: %.1f ns\n", median(coff, n)
    printf "median kernel cpu per message on:  %.1f ns\n", median(kon, n)
    printf "median kernel cpu per message off: %.1f ns\n", median(koff, n)
    printf "median context switches per message on:  %.3f\n", median(son, n)
    printf "median context switches per message off: %.3f\n", median(soff, n)
    printf "median throughput ratio (on/off): %.4f\n", median(tr, n)
    printf "median cpu-per-message ratio (on/off): %.4f\n", median(cr, n)
    # The rounds of a pair run back to back, so their ratio cancels most of
    # the machine'"'"'s drift; the interval says whether many rounds resolve
    # what one cannot. It is the normal approximation, so it is printed
    # only from 20 rounds on.
    if (n >= 20) {
      printf "mean throughput ratio (on/off): %.4f, 95%% interval %.4f to %.4f\n", mean(tr, n), mean(tr, n) - ci(tr, n), mean(tr, n) + ci(tr, n)
      printf "mean cpu-per-message ratio (on/off): %.4f, 95%% interval %.4f to %.4f\n", mean(cr, n), mean(cr, n) - ci(cr, n), mean(cr, n) + ci(cr, n)
    }
  }
  function mean(a, n,   i, s) { for (i = 1; i <= n; i++) s += a[i]; return s / n }
  function ci(a, n,   i, m, v) {
    m = mean(a, n)
    for (i = 1; i <= n; i++) v += (a[i] - m) ^ 2
    return 1.96 * sqrt(v / (n - 1) / n)
  }'"$AWK_MEDIAN" "$results"
