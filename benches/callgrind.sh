#!/usr/bin/env bash
# Metrics on versus off in instructions, not seconds: runs the release agent
# under valgrind's callgrind with metrics enabled and disabled, alternately,
# drives the same load through it with the load generator, and reports the
# agent's instructions per message, how many of them run in metrics code
# (the `metrics` facade, the exporter, metrics-util, crossbeam, quanta, the
# rdtsc instruction, hyper and our telemetry module), and the median
# ratios. Instruction counts do not depend on what else the machine is doing,
# so this resolves differences far below the noise of wall-clock runs.
#
#   benches/callgrind.sh [--backend local|redis|redis_cluster] [--rounds 3] [--messages 50000]
#                        [--peers 16] [--mix get=90,put=10,delete=0] [--keys 10000]
#                        [--max-ratio R] [--compare metrics|tls] [--remote-write INTERVAL]
#
# --remote-write 15s runs both sides with metrics.remote_write pushing to a
# local receiver (a Python sink answering 204) every 15s; the "off" side
# ignores it with metrics disabled. The pushes run on the agent's runtime,
# so their instructions are counted with the messages'.
#
# --compare tls measures TLS instead: metrics stay on, and "on" is mutual TLS
# on the peer port (certificates from `loadgen --make-certs`), "off" plain
# TCP, so the ratio is what TLS costs per message (docs/performance.md,
# "TLS, Redis Cluster, and the agent without metrics").
#
# With --max-ratio it is a regression gate: it exits 1 when the median
# instructions-per-message ratio (on/off) exceeds R. CI runs it on local
# gets with R = 1.03 (.ci/run).
#
# Only the load is counted: callgrind's instrumentation is switched on after
# a warm-up of 2,000 messages and after the load's connections are open, and
# off before the agent stops. Profiles are
# kept in target/callgrind/<backend>-<mix>/ for callgrind_annotate.
#
# Valgrind runs one thread at a time. By default the thread that gives up
# its lock often takes it straight back, so how the tokio thread, the
# storage threads and redb's group commit interleave, and with it how many
# instructions a message costs, changed from round to round. --fair-sched=yes
# hands the lock to runnable threads in turn, which narrows the spread of
# rounds of one binary (docs/performance-history.md, "Callgrind:
# instructions per message").
set -euo pipefail
cd "$(dirname "$0")/.."

backend=local rounds=3 messages=50000 peers=16 mix="get=90,put=10,delete=0" keys=10000
max_ratio= compare=metrics remote_write=
. benches/common.sh
parse_args "backend rounds messages peers mix keys max-ratio compare remote-write" "$@"
for tool in valgrind callgrind_control callgrind_annotate python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required (Debian: apt-get install valgrind python3)" >&2; exit 1; }
done

case "$compare" in metrics|tls) ;; *) echo "--compare is metrics or tls" >&2; exit 2 ;; esac
build_release
out_dir=target/callgrind/$backend-${mix//[=,]/-}
[ "$compare" = tls ] && out_dir=$out_dir-tls
mkdir -p "$out_dir"
scratch

agent_env "$backend"

load() { "$loadgen_bin" --addr "127.0.0.1:$peer_port" --peers "$peers" --keys "$keys" "$@"; }

preload "$keys"
if [ -n "$remote_write" ]; then
  # A remote-write receiver that takes everything: it only has to answer.
  sink_port=$(free_port)
  python3 - "$sink_port" >"$work/sink.log" 2>&1 <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
  pids+=($!)
  wait_port "$sink_port"
  export AGENT_METRICS__REMOTE_WRITE__URL="http://127.0.0.1:$sink_port/api/v1/write"
  export AGENT_METRICS__REMOTE_WRITE__INTERVAL="$remote_write"
fi
if [ "$compare" = tls ]; then
  "$loadgen_bin" --make-certs "$work/tls"
fi

results=$work/results
: >"$results"
# One run: $compare on ($2 = true) or off (false) in round $1.
measure() {
  local round=$1 on=$2
  profile=$out_dir/$compare-$on-round-$round.out
  run_env=(AGENT_METRICS__ENABLED="$on") tls=()
  if [ "$compare" = tls ]; then
    run_env=(AGENT_METRICS__ENABLED=true)
    if [ "$on" = true ]; then
      run_env+=(AGENT_NETWORK__TLS__CERT_FILE="$work/tls/server.pem"
                AGENT_NETWORK__TLS__KEY_FILE="$work/tls/server-key.pem"
                AGENT_NETWORK__TLS__CA_FILE="$work/tls/ca.pem")
      tls=(--tls-dir "$work/tls")
    fi
  fi
  env "${run_env[@]}" valgrind --tool=callgrind --fair-sched=yes --instr-atstart=no \
    --callgrind-out-file="$profile" "$agent_bin" >"$work/agent.log" 2>&1 &
  agent_pid=$!
  pids+=("$agent_pid")
  wait_port "$peer_port"
  load --messages 2000 --mix "$mix" ${tls[@]+"${tls[@]}"} >/dev/null
  # Connections are opened (and pinged) before counting starts: their
  # setup is per connection, not per message.
  rm -f "$work/connected" "$work/go"
  load --messages "$messages" --mix "$mix" ${tls[@]+"${tls[@]}"} --connected-file "$work/connected" --go-file "$work/go" >"$work/load.out" &
  load_pid=$!
  until [ -e "$work/connected" ]; do
    kill -0 "$load_pid" 2>/dev/null || { echo "load generator failed" >&2; exit 1; }
    sleep 0.05
  done
  callgrind_control -i on "$agent_pid" >/dev/null 2>&1
  touch "$work/go"
  wait "$load_pid"
  callgrind_control -i off "$agent_pid" >/dev/null 2>&1
  n=$(sed -nE 's/^RESULT messages=([0-9]+).*/\1/p' "$work/load.out")
  secs=$(sed -nE 's/^RESULT .*seconds=([0-9.]+).*/\1/p' "$work/load.out")
  kill -TERM "$agent_pid"; wait "$agent_pid" || true
  python3 - "$profile" "$n" "$round" "$on" >>"$results" <<'PY'
import re, subprocess, sys
path, n, round_, on = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# A line of callgrind_annotate is metrics code when its source file or the
# function it was inlined into belongs to the metrics stack.
metrics = re.compile(r'/metrics-0\.|/metrics-util-|/metrics-exporter-|/metrics-process-|/quanta-|/crossbeam-epoch-|/crossbeam-utils-|/hyper-|/procfs|src/telemetry/|/x86/rdtsc\.rs'
                     r'|[ :<]metrics::|metrics_util::|metrics_exporter_|metrics_process::|quanta::|crossbeam_epoch::|crossbeam_utils::|hyper::|agent::telemetry::')
out = subprocess.run(['callgrind_annotate', '--auto=no', '--threshold=100', path],
                     capture_output=True, text=True, check=True).stdout
total = in_metrics = 0
for line in out.splitlines():
    m = re.match(r'\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$', line)
    if m and 'PROGRAM TOTALS' not in line:
        cost = int(m.group(1).replace(',', ''))
        total += cost
        if metrics.search(m.group(2)):
            in_metrics += cost
print(round_, on, f'{total / n:.1f}', f'{in_metrics / n:.1f}')
PY
  tail -1 "$results" | awk -v p="$profile" -v c="$compare" -v s="$secs" '{ printf "round %s %s=%s: %s instructions/msg, %s of them in metrics code, over %.1f s (%s)\n", $1, c, $2, $3, $4, s, p }'
}
alternate_rounds measure

summary=$(awk '
  { if ($2 == "true") { on[$1] = $3; on_m[$1] = $4 } else { off[$1] = $3; off_m[$1] = $4 } }
  END {
    n = 0
    for (k in on) { n++; a[n] = on[k]; b[n] = off[k]; r[n] = on[k] / off[k]; d[n] = on_m[k] - off_m[k]; s[n] = on_m[k] / on[k] * 100 }
    printf "median instructions per message on:  %.0f\n", median(a, n)
    printf "median instructions per message off: %.0f\n", median(b, n)
    printf "median metrics-code instructions per message, on minus off: %.0f\n", median(d, n)
    printf "median share of metrics code with metrics on: %.2f%%\n", median(s, n)
    printf "median instructions-per-message ratio (on/off): %.4f\n", median(r, n)
  }'"$AWK_MEDIAN" "$results")
[ "$compare" = tls ] && echo "(on: mutual TLS on the peer port; off: plain TCP; metrics on in both)"
echo "$summary"
ratio=$(sed -nE 's/^median instructions-per-message ratio \(on\/off\): //p' <<<"$summary")
if [ -n "$max_ratio" ]; then
  [ -n "$ratio" ] || { echo "FAIL: no on/off ratio was measured" >&2; exit 1; }
  if awk -v r="$ratio" -v m="$max_ratio" 'BEGIN { exit !(r > m) }'; then
    echo "FAIL: metrics on/off is $ratio instructions per message, above the limit $max_ratio" >&2
    exit 1
  fi
  echo "ok: metrics on/off is $ratio instructions per message, within the limit $max_ratio"
fi
