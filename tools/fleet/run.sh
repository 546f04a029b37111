#!/usr/bin/env bash
# A fleet of agents on one machine, and what it costs the Prometheus that
# collects it, in two modes:
#   push    (A): every agent pushes with remote write (metrics.listen: false,
#                metrics.remote_write.url set); Prometheus runs with
#                --web.enable-remote-write-receiver and scrapes nothing.
#   scrape  (B): every agent opens its metrics port; Prometheus scrapes all
#                of them, scrape_interval = the push interval.
# Each mode gets a fresh Prometheus (TSDB in a temp dir) and fresh agents
# (node ids fleet-001..., peer ports and data dirs of their own, all on
# 127.0.0.1), under a steady load from tools/fleet/fleet.py: one connection
# per agent, RATE messages a second (1 put : 9 gets over 100 keys).
# After a warm-up, over a fixed window, it measures:
#   - Prometheus: CPU seconds and RSS (/proc), Go heap in use, samples
#     appended per second and head series (its own /metrics, read directly:
#     Prometheus does not scrape itself, so its series stay out of the head);
#     memory per head series against the empty Prometheus of the same run;
#   - agents: CPU (sum, mean and max per agent) and RSS, from /proc;
#   - push: bytes and samples per push, from the agents' own
#     agent_remote_write_* counters as pushed to Prometheus (the agents have
#     no metrics port); scrape: samples per scrape (scrape_samples_scraped)
#     and the size of one scrape, plain and gzip.
# It prints a table and writes it to OUT (markdown) and to OUT with .json.
#
# Usage (from the repository root, after `cargo build --release`):
#   tools/fleet/run.sh [--agents 100] [--rate 20] [--interval 15]
#                      [--warmup 60] [--measure 180] [--modes "push scrape"]
#                      [--agent-bin target/release/agent]
#                      [--prometheus prometheus] [--prometheus-flags "..."] OUT.md
# (--prometheus-flags: more flags for Prometheus, e.g.
# "--web.max-connections=2000" for more agents than its default 512)
# Needs: bash, python3 (standard library only), curl, a Prometheus >= 2.33
# (--web.enable-remote-write-receiver; Debian's `prometheus` package), the
# release agent binary, about 1.1 GiB of free memory for 100 agents (10 MiB
# each, plus Prometheus), and 2 * agents + 1 free loopback ports.
# Takes: per mode, about 15 s to start + warmup + measure + up to 15 s to
# stop; with the defaults, 8.5 minutes for both modes (measured).
# The figures and what they mean for a fleet: docs/fleet.md.
# Every wait has a deadline; every process started here is stopped on exit
# (also on Ctrl-C), and the temp dir is removed.
set -euo pipefail

agents=100 rate=20 interval=15 warmup=60 measure=180 modes="push scrape"
agent_bin=target/release/agent prometheus=prometheus prometheus_flags=""
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --agents|--rate|--interval|--warmup|--measure|--modes|--agent-bin|--prometheus|--prometheus-flags)
      [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
      name=${1#--}; printf -v "${name//-/_}" '%s' "$2"; shift 2 ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "one OUT file only" >&2; exit 2; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: $0 [options] OUT.md (see the header)" >&2; exit 2; }
[ -x "$agent_bin" ] || { echo "no agent binary at $agent_bin (cargo build --release)" >&2; exit 2; }
command -v "$prometheus" >/dev/null || { echo "no $prometheus on PATH" >&2; exit 2; }
[ "$agents" -ge 1 ] && [ "$agents" -le 999 ] || { echo "--agents: 1 to 999" >&2; exit 2; }
[ "$(ulimit -n)" -ge $((agents * 4 + 100)) ] || ulimit -n $((agents * 4 + 100))

here=$(cd "$(dirname "$0")" && pwd)
helper() { python3 "$here/fleet.py" "$@"; }
agent_bin=$(realpath "$agent_bin")
out=$(realpath -m "$out")
# Only this script's settings reach the agents.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^AGENT_' || true)
unset RUST_LOG

work=$(mktemp -d /tmp/fleet.XXXXXX)
pids=()
# Stops every process started here: SIGTERM, up to 10 s, then SIGKILL.
stop_all() {
  local p deadline=$((SECONDS + 10))
  # Newest first: the load and the agents (which flush a last push) before
  # the Prometheus they push to.
  for ((p = ${#pids[@]} - 1; p >= 0; p--)); do kill "${pids[p]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# Waits until "$@" succeeds, at most $1 seconds; 1 if it never does.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1"); }
# Every agent of this mode still running, or exit.
check_alive() {
  local p i=0
  for p in $(cat "$dir/agent.pids"); do
    i=$((i + 1))
    kill -0 "$p" 2>/dev/null && continue
    echo "agent fleet-$(printf %03d $i) (pid $p) exited; its log:" >&2
    tail -n 20 "$dir/agents/fleet-$(printf %03d $i)/agent.log" >&2 || true
    exit 1
  done
}

run_mode() { # $1 = push | scrape
  local mode=$1 i id p
  dir=$work/$mode
  mkdir -p "$dir/agents" "$dir/tsdb"
  read -r -a ports <<<"$(helper ports $((2 * agents + 1)))"
  local prom_port=${ports[0]} prom_url
  prom_url=http://127.0.0.1:$prom_port
  printf '%s\n' "${ports[@]:1:agents}" >"$dir/peer.ports"
  printf '%s\n' "${ports[@]:agents+1:agents}" >"$dir/metrics.ports"

  # Prometheus: no rules, no self-scrape; scrape mode lists every agent.
  {
    echo "global: {scrape_interval: ${interval}s, scrape_timeout: $((interval < 10 ? interval : 10))s, evaluation_interval: 1m}"
    if [ "$mode" = scrape ]; then
      echo "scrape_configs:"
      echo "  - job_name: agent"
      echo "    static_configs:"
      echo "      - targets:"
      for p in $(cat "$dir/metrics.ports"); do echo "          - 127.0.0.1:$p"; done
    else
      echo "scrape_configs: []"
    fi
  } >"$dir/prometheus.yml"
  "$prometheus" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" --web.enable-remote-write-receiver \
    --log.level=warn $prometheus_flags >"$dir/prometheus.log" 2>&1 &
  local prom_pid=$!
  pids+=("$prom_pid")
  # Ends early when Prometheus exits; the kill -0 after it tells which.
  prom_ready() { ! kill -0 "$prom_pid" || curl -sf -o /dev/null --max-time 2 "$prom_url/-/ready"; }
  wait_for 60 prom_ready && kill -0 "$prom_pid" \
    || { echo "Prometheus never became ready:" >&2; cat "$dir/prometheus.log" >&2; exit 1; }
  sleep 5 # settle, then the empty Prometheus's memory
  helper meta "$mode" "$agents" "$rate" "$interval" "$prom_url" "$prom_pid" "$dir/meta.json"

  echo "[$mode] starting $agents agents" >&2
  : >"$dir/agent.pids"
  for i in $(seq 1 "$agents"); do
    id=$(printf 'fleet-%03d' "$i")
    mkdir -p "$dir/agents/$id"
    local env=(
      AGENT_NODE__ID="$id"
      AGENT_NETWORK__LISTEN="127.0.0.1:$(sed -n "${i}p" "$dir/peer.ports")"
      AGENT_STORAGE__LOCAL__PATH="$dir/agents/$id/agent.db"
      AGENT_METRICS__ADDRESS=127.0.0.1
      AGENT_METRICS__PORT="$(sed -n "${i}p" "$dir/metrics.ports")"
    )
    if [ "$mode" = push ]; then
      env+=(AGENT_METRICS__LISTEN=false
            AGENT_METRICS__REMOTE_WRITE__URL="$prom_url/api/v1/write"
            AGENT_METRICS__REMOTE_WRITE__INTERVAL="${interval}s")
    fi
    (cd "$dir/agents/$id" && exec env "${env[@]}" "$agent_bin" >agent.log 2>&1) &
    pids+=("$!")
    echo "$!" >>"$dir/agent.pids"
  done
  for p in $(cat "$dir/peer.ports"); do
    wait_for 60 port_open "$p" || { echo "an agent never listened on $p" >&2; exit 1; }
  done
  check_alive

  echo "[$mode] load: $rate msg/s per agent; warm-up ${warmup}s, then ${measure}s measured" >&2
  python3 "$here/fleet.py" loadgen "$dir/peer.ports" "$rate" $((warmup + measure + 5)) "$dir/loadgen.json" &
  local lg_pid=$!
  pids+=("$lg_pid")
  sleep "$warmup"
  check_alive
  helper snapshot "$mode" "$prom_url" "$prom_pid" "$dir/agent.pids" "$lg_pid" "$dir/snap0.json"
  sleep "$measure"
  check_alive
  helper snapshot "$mode" "$prom_url" "$prom_pid" "$dir/agent.pids" "$lg_pid" "$dir/snap1.json"
  if [ "$mode" = scrape ]; then
    helper scrape-sizes "$dir/metrics.ports" "$dir/sizes.json"
  fi
  # The load generator ends by itself 5 s after the window.
  wait_for 60 bash -c "! kill -0 $lg_pid" || true
  helper summarize "$mode" "$dir/meta.json" "$dir/snap0.json" "$dir/snap1.json" \
    "$dir/loadgen.json" "$work/result-$mode.json" "$dir/sizes.json"
  stop_all
}

results=()
for mode in $modes; do
  case $mode in push|scrape) ;; *) echo "unknown mode $mode" >&2; exit 2 ;; esac
  run_mode "$mode"
  results+=("$work/result-$mode.json")
done
helper report "$out" "${results[@]}"
echo "written: $out and ${out%.md}.json" >&2
