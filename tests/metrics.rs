//! The metrics endpoint of the real agent binary, over real sockets: format,
//! exact counts on both storage backends, peer accounting, process metrics,
//! access control, paths, and startup with metrics disabled or the port
//! taken.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use agent::telemetry::defs::Source;
use agent::telemetry::METRICS;
use common::*;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metric set the issue requires on every scrape.
const REQUIRED: &[(&str, &str)] = &[
    ("process_cpu_usage", "gauge"),
    ("process_memory_bytes", "gauge"),
    ("agent_peers_connected", "gauge"),
    ("messages_received_total", "counter"),
    ("messages_failed_total", "counter"),
    ("message_processing_duration_seconds", "histogram"),
    ("storage_operations_total", "counter"),
    ("storage_operation_errors_total", "counter"),
    ("storage_operation_duration_seconds", "histogram"),
    ("agent_build_info", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("process_threads", "gauge"),
];

const REASONS: [&str; 5] = ["parse", "invalid", "unknown_op", "too_large", "storage"];
const OPERATIONS: [&str; 3] = ["get", "put", "delete"];

/// A scrape after traffic that touches every series: successes on every
/// storage operation and one failure of each kind a peer can cause.
fn scrape_after_traffic(agent: &Agent) -> String {
    let mut peer = agent.connect();
    assert_eq!(peer.put("k", "v")["ok"], true);
    assert_eq!(peer.get("k")["value"], "v");
    assert_eq!(peer.delete("k")["deleted"], true);
    for bad in ["not json", "[]", r#"{"op":"fly"}"#] {
        let reply: serde_json::Value = serde_json::from_str(&peer.request(bad)).unwrap();
        assert_eq!(reply["ok"], false, "{bad}");
    }
    agent.scrape()
}

#[test]
fn endpoint_serves_prometheus_text_with_every_metric() {
    // Remote write on, so that its series are on the page too.
    let receiver = Receiver::start(Vec::new());
    let agent = Agent::start_with(
        AgentOptions::default().env("AGENT_METRICS__REMOTE_WRITE__URL", receiver.url()),
    );
    let resp = agent.http_get("/metrics");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some(CONTENT_TYPE));
    // The agent's own gauges are on the very first scrape...
    for name in [
        "process_cpu_usage",
        "process_memory_bytes",
        "agent_peers_connected",
    ] {
        let type_line = format!("# TYPE {name} gauge\n");
        assert!(resp.body.contains(&type_line), "{name} in:\n{}", resp.body);
    }
    // ...the metrics-process set once the sampler's first sample, started
    // just before "agent ready", has run.
    let complete = |t: &str| {
        sample(t, "process_memory_bytes", &[]).is_some_and(|v| v > 0.0)
            && METRICS
                .iter()
                .all(|d| t.contains(&format!("# TYPE {} ", d.name)))
    };
    let mut text = resp.body;
    if !complete(&text) {
        let ok = wait_until(|| {
            text = agent.scrape();
            complete(&text)
        });
        assert!(ok, "metrics missing:\n{text}");
    }

    // Everything the issue lists is defined in METRICS with the same type...
    for (name, kind) in REQUIRED {
        let def = METRICS
            .iter()
            .find(|d| d.name == *name)
            .unwrap_or_else(|| panic!("{name} not in METRICS"));
        assert_eq!(def.kind.as_str(), *kind, "{name}");
    }
    // ...and every defined metric is on the page with its HELP and TYPE lines.
    for def in METRICS {
        let type_line = format!("# TYPE {} {}", def.name, def.kind.as_str());
        let help_prefix = format!("# HELP {} ", def.name);
        assert_eq!(
            text.lines().filter(|l| *l == type_line).count(),
            1,
            "{type_line:?} in:\n{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&help_prefix)).count(),
            1,
            "{help_prefix:?}"
        );
        if def.source == Source::Agent {
            assert!(
                text.contains(&format!("{help_prefix}{}\n", def.help)),
                "help of {}",
                def.name
            );
        }
    }
    assert_eq!(
        text.lines().filter(|l| l.starts_with("# TYPE ")).count(),
        METRICS.len(),
        "{text}"
    );

    assert_eq!(
        value(
            &text,
            "agent_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(value(&text, "agent_peers_connected", &[]), 0.0);
    assert_eq!(value(&text, "agent_connections_rejected_total", &[]), 0.0);
    assert_eq!(value(&text, "messages_received_total", &[]), 0.0);
    // Every label set exists before the first message, at zero.
    for reason in REASONS {
        assert_eq!(
            value(&text, "messages_failed_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    for op in OPERATIONS {
        assert_storage_op(&text, op, "local", 0.0, 0.0);
    }
    assert!(value(&text, "process_memory_bytes", &[]) > 1e6);
    assert!(value(&text, "process_threads", &[]) >= 1.0);
    assert!(value(&text, "process_open_fds", &[]) >= 3.0);
}

#[test]
fn scrape_passes_promtool_check_metrics() {
    let Some(promtool) = require_bin("promtool") else {
        return;
    };
    let agent = Agent::start();
    let text = scrape_after_traffic(&agent);
    let out = promtool_check_metrics(&promtool, &text);
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool failed ({}):\n{complaints}\npage:\n{text}",
        out.status
    );
    assert_eq!(complaints, "", "promtool complained; page:\n{text}");
}

#[test]
fn histograms_are_real_histograms_with_the_defined_buckets() {
    let agent = Agent::start();
    let text = scrape_after_traffic(&agent);
    assert!(!text.contains("quantile="), "summary lines in:\n{text}");
    assert!(!text.contains(" summary\n"), "a summary TYPE in:\n{text}");
    assert!(text.contains("# TYPE message_processing_duration_seconds histogram\n"));

    for (def, buckets) in explicit_histograms() {
        // Bucket lines grouped by their labels other than `le`, in page order.
        let bucket_prefix = format!("{}_bucket{{", def.name);
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with(&bucket_prefix)) {
            let (labels, count) = line[bucket_prefix.len()..]
                .rsplit_once("} ")
                .expect("bucket line");
            let mut le = None;
            let mut rest = Vec::new();
            for pair in labels.split(',') {
                match pair.strip_prefix("le=") {
                    Some(v) => {
                        le = Some(
                            v.trim_matches('"')
                                .replace("+Inf", "inf")
                                .parse::<f64>()
                                .unwrap(),
                        )
                    }
                    None => rest.push(pair.to_string()),
                }
            }
            rest.sort();
            let le = le.unwrap_or_else(|| panic!("bucket without le: {line}"));
            series
                .entry(rest.join(","))
                .or_default()
                .push((le, count.parse().unwrap()));
        }
        let expected_sets = if def.labels.is_empty() {
            1
        } else {
            OPERATIONS.len()
        };
        assert_eq!(series.len(), expected_sets, "{}: {series:?}", def.name);
        for (labels, points) in &series {
            let les: Vec<f64> = points.iter().map(|p| p.0).collect();
            let mut want = buckets.to_vec();
            want.push(f64::INFINITY);
            assert_eq!(les, want, "{}{{{labels}}} buckets", def.name);
            assert!(
                points.windows(2).all(|w| w[0].1 <= w[1].1),
                "{} not cumulative: {points:?}",
                def.name
            );
            let label_pairs: Vec<(&str, &str)> = if labels.is_empty() {
                Vec::new()
            } else {
                labels
                    .split(',')
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap();
                        (k, v.trim_matches('"'))
                    })
                    .collect()
            };
            let count = value(&text, &format!("{}_count", def.name), &label_pairs);
            assert_eq!(
                points.last().unwrap().1,
                count,
                "{}{{{labels}}} +Inf != _count",
                def.name
            );
            assert!(sample(&text, &format!("{}_sum", def.name), &label_pairs).is_some());
        }
    }
    // The traffic above: 3 storage operations and 3 failures.
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        6.0
    );
}

/// One storage operation's series: `operations` completed (and as many
/// durations recorded), `errors` of them failed.
fn assert_storage_op(text: &str, op: &str, backend: &str, operations: f64, errors: f64) {
    let labels = [("operation", op), ("backend", backend)];
    let series = [
        ("storage_operations_total", operations),
        ("storage_operation_errors_total", errors),
        ("storage_operation_duration_seconds_count", operations),
    ];
    for (name, want) in series {
        assert_eq!(value(text, name, &labels), want, "{name} {op} {backend}");
    }
}

/// Exactly N puts, M gets and K deletes over two peer connections, then one
/// failure of each kind a peer can cause; every count must be exact.
fn assert_exact_counts(agent: &Agent, backend: &str, other_backend: &str) {
    const N: usize = 7;
    const M: usize = 5;
    const K: usize = 3;
    let mut writer = agent.connect();
    let mut reader = agent.connect();
    for i in 0..N {
        assert_eq!(
            writer.put(&format!("key{i}"), &format!("value{i}"))["ok"],
            true
        );
    }
    for i in 0..M {
        assert_eq!(reader.get(&format!("key{i}"))["value"], format!("value{i}"));
    }
    for i in 0..K {
        assert_eq!(reader.delete(&format!("key{i}"))["deleted"], true);
    }

    let text = agent.scrape();
    let total = (N + M + K) as f64;
    assert_eq!(value(&text, "messages_received_total", &[]), total);
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        total
    );
    assert_eq!(
        value(
            &text,
            "message_processing_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        total
    );
    assert!(value(&text, "message_processing_duration_seconds_sum", &[]) > 0.0);
    for reason in REASONS {
        assert_eq!(
            value(&text, "messages_failed_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    for (op, n) in [("put", N), ("get", M), ("delete", K)] {
        let labels = [("operation", op), ("backend", backend)];
        let n = n as f64;
        assert_storage_op(&text, op, backend, n, 0.0);
        let inf = [("operation", op), ("backend", backend), ("le", "+Inf")];
        assert_eq!(
            value(&text, "storage_operation_duration_seconds_bucket", &inf),
            n,
            "{op}"
        );
        assert!(
            value(&text, "storage_operation_duration_seconds_sum", &labels) > 0.0,
            "{op}"
        );
        let other = [("operation", op), ("backend", other_backend)];
        assert_eq!(
            sample(&text, "storage_operations_total", &other),
            None,
            "{op} on {other_backend}"
        );
    }

    // Failures are messages too, and touch no storage.
    for bad in ["not json", r#"{"op":"get"}"#, r#"{"op":"fly"}"#] {
        let reply: serde_json::Value = serde_json::from_str(&reader.request(bad)).unwrap();
        assert_eq!(reply["ok"], false, "{bad}");
    }
    let text = agent.scrape();
    assert_eq!(value(&text, "messages_received_total", &[]), total + 3.0);
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        total + 3.0
    );
    for (reason, n) in [
        ("parse", 1.0),
        ("invalid", 1.0),
        ("unknown_op", 1.0),
        ("too_large", 0.0),
        ("storage", 0.0),
    ] {
        assert_eq!(
            value(&text, "messages_failed_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    for (op, n) in [("put", N), ("get", M), ("delete", K)] {
        let labels = [("operation", op), ("backend", backend)];
        assert_eq!(
            value(&text, "storage_operations_total", &labels),
            n as f64,
            "{op}"
        );
    }
}

#[test]
fn counts_are_exact_on_the_local_backend() {
    let agent = Agent::start();
    assert_exact_counts(&agent, "local", "redis");
}

#[test]
fn counts_are_exact_on_the_redis_backend_and_errors_are_counted() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let agent = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_STORAGE__BACKEND", "redis")
            .env("AGENT_STORAGE__REDIS__URL", redis.url()),
    );
    assert_exact_counts(&agent, "redis", "local");

    // With Redis gone, an operation fails: counted as an operation, an
    // error, a duration, and a failed message with reason "storage".
    redis.stop();
    let mut peer = agent.connect();
    let reply = peer.get("key4");
    assert_eq!(reply["ok"], false, "{reply}");
    let text = agent.scrape();
    assert_storage_op(&text, "get", "redis", 6.0, 1.0);
    assert_eq!(
        value(&text, "messages_failed_total", &[("reason", "storage")]),
        1.0
    );
    assert_eq!(value(&text, "messages_received_total", &[]), 19.0);
    for op in ["put", "delete"] {
        let labels = [("operation", op), ("backend", "redis")];
        assert_eq!(
            value(&text, "storage_operation_errors_total", &labels),
            0.0,
            "{op}"
        );
    }
}

#[test]
fn counts_are_exact_with_concurrent_and_pipelining_peers() {
    const PEERS: usize = 4;
    const ROUNDS: usize = 20;
    const PIPELINED: usize = 50;
    let agent = Agent::start();
    std::thread::scope(|s| {
        for p in 0..PEERS {
            let agent = &agent;
            s.spawn(move || {
                let mut peer = agent.connect();
                for r in 0..ROUNDS {
                    let key = format!("p{p}r{r}");
                    assert_eq!(peer.put(&key, "v")["ok"], true);
                    assert_eq!(peer.get(&key)["value"], "v");
                    assert_eq!(peer.delete(&key)["deleted"], true);
                }
            });
        }
        s.spawn(|| {
            // All requests in one write, then all replies.
            let mut peer = agent.connect();
            let batch: String = (0..PIPELINED)
                .map(|i| format!("{{\"id\":{i},\"op\":\"ping\"}}\n"))
                .collect();
            peer.send_raw(batch.as_bytes());
            for i in 0..PIPELINED {
                assert_eq!(
                    peer.read_line().as_deref(),
                    Some(format!("{{\"id\":{i},\"ok\":true}}").as_str())
                );
            }
        });
    });
    let text = agent.scrape();
    let total = (PEERS * ROUNDS * 3 + PIPELINED) as f64;
    assert_eq!(value(&text, "messages_received_total", &[]), total);
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        total
    );
    for op in OPERATIONS {
        let labels = [("operation", op), ("backend", "local")];
        assert_eq!(
            value(&text, "storage_operations_total", &labels),
            (PEERS * ROUNDS) as f64,
            "{op}"
        );
        assert_eq!(
            value(&text, "storage_operation_duration_seconds_count", &labels),
            (PEERS * ROUNDS) as f64
        );
    }
}

#[test]
fn peers_connected_follows_connects_and_every_way_of_leaving() {
    let agent = Agent::start();
    assert_eq!(value(&agent.scrape(), "agent_peers_connected", &[]), 0.0);
    let closer = agent.connect();
    wait_for_value(&agent, "agent_peers_connected", &[], 1.0);
    let resetter = agent.connect();
    wait_for_value(&agent, "agent_peers_connected", &[], 2.0);
    let mut half = agent.connect();
    wait_for_value(&agent, "agent_peers_connected", &[], 3.0);

    // Scrapes are not peers.
    assert_eq!(
        value(
            &agent.http_get("/metrics").body,
            "agent_peers_connected",
            &[]
        ),
        3.0
    );

    drop(closer); // FIN
    wait_for_value(&agent, "agent_peers_connected", &[], 2.0);
    resetter.reset(); // RST
    wait_for_value(&agent, "agent_peers_connected", &[], 1.0);
    half.send_raw(br#"{"id":1,"op":"put","key":"ha"#); // half a line, then FIN
    drop(half);
    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);

    // Half a line then RST.
    let mut half_reset = agent.connect();
    wait_for_value(&agent, "agent_peers_connected", &[], 1.0);
    half_reset.send_raw(br#"{"id":2,"op":"get","#);
    half_reset.reset();
    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);

    let text = agent.scrape();
    assert_eq!(
        value(&text, "messages_received_total", &[]),
        0.0,
        "a partial line is not a message"
    );
    assert_eq!(value(&text, "agent_connections_rejected_total", &[]), 0.0);
}

#[test]
fn connections_over_the_limit_are_rejected_and_not_counted_as_peers() {
    let agent = Agent::start_with(AgentOptions::default().env("AGENT_NETWORK__MAX_CONNECTIONS", 1));
    let mut first = agent.connect();
    assert_eq!(first.request(r#"{"op":"ping"}"#), r#"{"ok":true}"#);
    wait_for_value(&agent, "agent_peers_connected", &[], 1.0);

    let mut rejected = agent.connect();
    assert_eq!(rejected.read_line(), None, "over the limit: closed at once");
    wait_for_value(&agent, "agent_connections_rejected_total", &[], 1.0);
    assert_eq!(value(&agent.scrape(), "agent_peers_connected", &[]), 1.0);

    drop(first);
    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);
    let mut next = agent.connect();
    assert_eq!(next.request(r#"{"op":"ping"}"#), r#"{"ok":true}"#);
    let text = agent.scrape();
    assert_eq!(value(&text, "agent_peers_connected", &[]), 1.0);
    assert_eq!(value(&text, "agent_connections_rejected_total", &[]), 1.0);
    assert_eq!(value(&text, "messages_received_total", &[]), 2.0);
}

#[test]
fn outbound_peers_are_counted_too() {
    let mut target = Agent::start();
    // A long ping interval: a lost peer must be noticed when it closes,
    // not at the next ping.
    let dialer = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_NETWORK__PEERS", format!("[{}]", target.peer_addr))
            .env("AGENT_NETWORK__PING_INTERVAL", "60s"),
    );
    // The same connection: outbound on the dialer, inbound on the target.
    wait_for_value(&dialer, "agent_peers_connected", &[], 1.0);
    wait_for_value(&target, "agent_peers_connected", &[], 1.0);
    // The dialer pings once at once; the ping is a message on the target.
    wait_for_value(&target, "messages_received_total", &[], 1.0);

    let port = target.peer_addr.port();
    assert!(target.terminate().success());
    wait_for_value(&dialer, "agent_peers_connected", &[], 0.0);

    // The dialer redials a peer that comes back.
    let target = Agent::start_with(AgentOptions {
        peer_port: Some(port),
        ..AgentOptions::default()
    });
    wait_for_value(&dialer, "agent_peers_connected", &[], 1.0);
    wait_for_value(&target, "agent_peers_connected", &[], 1.0);
    wait_for_value(&target, "messages_received_total", &[], 1.0);
}

#[test]
fn process_metrics_agree_with_proc() {
    let agent =
        Agent::start_with(AgentOptions::default().env("AGENT_METRICS__PROCESS_INTERVAL", "200ms"));
    let pid = agent.pid();
    let within = |a: f64, b: f64| (a - b).abs() <= 0.10 * b;
    let mut last = String::new();
    let ok = wait_until(|| {
        let before = vm_rss_bytes(pid) as f64;
        let text = agent.scrape();
        let after = vm_rss_bytes(pid) as f64;
        // NaN (never within 10%) until the first sample.
        let ours = sample(&text, "process_memory_bytes", &[]).unwrap_or(f64::NAN);
        let theirs = sample(&text, "process_resident_memory_bytes", &[]).unwrap_or(f64::NAN);
        last = format!("VmRSS {before}..{after}, process_memory_bytes {ours}, process_resident_memory_bytes {theirs}");
        [ours, theirs]
            .iter()
            .all(|&v| within(v, before) && within(v, after))
    });
    assert!(ok, "memory does not agree with /proc within 10%: {last}");

    // The sampler runs every 200 ms: new connections show up in
    // process_open_fds and CPU use is measured.
    let text = agent.scrape();
    let fds = value(&text, "process_open_fds", &[]);
    let peers: Vec<Peer> = (0..10).map(|_| agent.connect()).collect();
    wait_for_value(&agent, "agent_peers_connected", &[], 10.0);
    let ok = wait_until(|| value(&agent.scrape(), "process_open_fds", &[]) >= fds + 10.0);
    assert!(
        ok,
        "process_open_fds did not follow 10 new connections from {fds}"
    );
    drop(peers);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ok = wait_until(|| {
        let cpu = value(&agent.scrape(), "process_cpu_usage", &[]);
        assert!(
            cpu.is_finite() && (0.0..=100.0 * cores + 50.0).contains(&cpu),
            "process_cpu_usage {cpu}"
        );
        cpu > 0.0
    });
    assert!(ok, "process_cpu_usage stayed 0 while serving scrapes");

    let text = agent.scrape();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = value(&text, "process_start_time_seconds", &[]);
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "start {start}, now {now}"
    );
    assert!(value(&text, "process_max_fds", &[]) >= value(&text, "process_open_fds", &[]));
    assert!(
        value(&text, "process_virtual_memory_bytes", &[])
            >= value(&text, "process_resident_memory_bytes", &[])
    );
}

/// Process metrics are read from /proc at each scrape (issue #10): CPU
/// seconds and start time to the clock tick, an unlimited address space as
/// 2^64, and a first `process_cpu_usage` that covers the idle agent, not its
/// startup.
#[test]
fn process_metrics_are_read_at_scrape() {
    let agent = Agent::start();
    let pid = agent.pid();
    let hz = clock_ticks_per_second();
    // Idle for a moment: the first CPU window starts when the agent is
    // ready, so it must not show startup work (it read 39% to 86% when the
    // first sample averaged over the process's life).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = cpu_ticks(pid) as f64 / hz;
    let text = agent.scrape();
    let after = cpu_ticks(pid) as f64 / hz;
    let usage = value(&text, "process_cpu_usage", &[]);
    assert!(
        (0.0..25.0).contains(&usage),
        "first process_cpu_usage of an idle agent: {usage}%"
    );
    // Exactly what /proc says at the scrape, in ticks: not whole seconds.
    let cpu = value(&text, "process_cpu_seconds_total", &[]);
    assert!(
        (before..=after).contains(&cpu),
        "process_cpu_seconds_total {cpu} not in [{before}, {after}]"
    );
    assert_eq!((cpu * hz).round(), cpu * hz, "a whole number of ticks");

    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .expect("btime in /proc/stat");
    let starttime = proc_stat_fields(pid)[22 - 3] as f64;
    assert_eq!(
        value(&text, "process_start_time_seconds", &[]),
        btime + starttime / hz
    );

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let address_space = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .and_then(|l| l.split_whitespace().nth(3))
        .expect("Max address space in /proc/pid/limits")
        .to_owned();
    let max = value(&text, "process_virtual_memory_max_bytes", &[]);
    if address_space == "unlimited" {
        assert_eq!(max, 18446744073709551615u64 as f64, "unlimited is 2^64");
    } else {
        assert_eq!(max, address_space.parse::<f64>().unwrap());
    }
}

#[test]
fn metrics_disabled_starts_no_endpoint() {
    let mut agent =
        Agent::start_with(AgentOptions::default().env("AGENT_METRICS__ENABLED", "false"));
    agent.wait_for_log("Metrics endpoint disabled");
    let err =
        TcpStream::connect(agent.metrics_addr).expect_err("nothing may listen on the metrics port");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The agent itself works.
    let mut peer = agent.connect();
    assert_eq!(peer.put("a", "1")["ok"], true);
    assert_eq!(peer.get("a")["value"], "1");
    assert!(TcpStream::connect(agent.metrics_addr).is_err());
    assert!(
        !agent.log().contains("metrics endpoint listening"),
        "{}",
        agent.log()
    );
}

#[test]
fn allowed_networks_forbid_other_clients() {
    let denied = Agent::start_with(
        AgentOptions::default().env("AGENT_METRICS__ALLOWED_NETWORKS", "[10.0.0.0/8]"),
    );
    for path in ["/metrics", "/health", "/nope"] {
        let resp = denied.http_get(path);
        assert_eq!(resp.status, 403, "{path}: {resp:?}");
        assert_eq!(resp.body, "Forbidden\n", "{path}");
    }

    let allowed = Agent::start_with(
        AgentOptions::default().env("AGENT_METRICS__ALLOWED_NETWORKS", "[127.0.0.0/8]"),
    );
    let resp = allowed.http_get("/metrics");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some(CONTENT_TYPE));
    assert!(resp
        .body
        .contains("# TYPE messages_received_total counter\n"));
}

#[test]
fn health_answers_ok_other_paths_404_and_metrics_path_is_configurable() {
    let agent = Agent::start();
    let health = agent.http_get("/health");
    assert_eq!((health.status, health.body.as_str()), (200, "OK\n"));
    let ready = agent.http_get("/ready");
    assert_eq!((ready.status, ready.body.as_str()), (200, "OK\n"));
    assert_eq!(
        http_request(agent.metrics_addr, "HEAD", "/ready").status_and_body(),
        (200, String::new())
    );
    for path in [
        "/",
        "/nope",
        "/metrics/",
        "/metricsx",
        "/health/x",
        "/ready/x",
    ] {
        let resp = agent.http_get(path);
        assert_eq!(
            (resp.status, resp.body.as_str()),
            (404, "Not Found\n"),
            "{path}"
        );
    }
    assert_eq!(agent.http_get("/metrics?x=1").status, 200);
    assert_eq!(
        http_request(agent.metrics_addr, "POST", "/metrics").status,
        405
    );
    assert_eq!(
        http_request(agent.metrics_addr, "HEAD", "/metrics").status_and_body(),
        (200, String::new())
    );

    let custom =
        Agent::start_with(AgentOptions::default().env("AGENT_METRICS__PATH", "/internal/prom"));
    let resp = custom.http_get("/internal/prom");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some(CONTENT_TYPE));
    assert!(
        resp.body.contains("# TYPE agent_peers_connected gauge\n"),
        "{}",
        resp.body
    );
    assert_eq!(custom.http_get("/metrics").status, 404);
    assert_eq!(custom.http_get("/health").status, 200);
    assert_eq!(custom.http_get("/ready").status, 200);
}

/// Runs the binary with free peer and storage settings to its exit.
fn run_to_exit(env: &[(&str, String)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let db = dir.path().join("agent.db").display().to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("AGENT_NETWORK__LISTEN", listen.as_str()),
        ("AGENT_STORAGE__LOCAL__PATH", db.as_str()),
    ];
    all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_agent(dir.path(), &[], &all)
}

#[test]
fn metrics_port_in_use_stops_startup_with_one_line_naming_the_address() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let env = |level: &str| {
        vec![
            ("AGENT_METRICS__ADDRESS", "127.0.0.1".to_string()),
            ("AGENT_METRICS__PORT", addr.port().to_string()),
            ("AGENT_LOG__LEVEL", level.to_string()),
        ]
    };
    let prefix = format!("agent: cannot listen for metrics on {addr}: ");

    // Logging off: the error is all there is, on one line.
    let (status, stdout, stderr) = run_to_exit(&env("off"));
    assert_eq!(
        status, 1,
        "README: 1 = runtime failure at startup; stderr:\n{stderr}"
    );
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr:?}");
    assert!(
        lines[0].starts_with(&prefix) && lines[0].contains("in use"),
        "{stderr:?}"
    );

    // Default logging: the same line ends the output, and the agent never got ready.
    let (status, _, stderr) = run_to_exit(&env("info"));
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&prefix)),
        "{stderr}"
    );
    assert!(!stderr.contains("agent ready"), "{stderr}");
    let mentions = stderr
        .lines()
        .filter(|l| l.contains("cannot listen for metrics"));
    assert_eq!(
        mentions.count(),
        1,
        "the error once, not also as a log line:\n{stderr}"
    );
    drop(holder);
}

#[test]
fn gzip_is_served_to_clients_that_accept_it() {
    use std::io::Read as _;
    let agent = Agent::start();
    agent.connect().known_traffic(3, 2, 1, 0);
    let header =
        |h: &[(String, String)], k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());

    let (status, h, plain) = get_with_headers(agent.metrics_addr, "/metrics", "");
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-encoding"), None);
    let (status, h, gz) =
        get_with_headers(agent.metrics_addr, "/metrics", "Accept-Encoding: gzip\r\n");
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        header(&h, "vary").as_deref(),
        Some("Accept, Accept-Encoding")
    );
    assert_eq!(header(&h, "content-type").as_deref(), Some(CONTENT_TYPE));
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut unzipped)
        .expect("a valid gzip body");
    assert!(
        gz.len() * 3 < unzipped.len(),
        "compressed {} of {}",
        gz.len(),
        unzipped.len()
    );
    let plain = String::from_utf8(plain).unwrap();
    // The same page: the same series, HELP and TYPE lines; and the values
    // that did not move between the two scrapes are equal.
    assert_eq!(page_shape(&unzipped), page_shape(&plain));
    for (name, labels) in [
        ("messages_received_total", &[][..]),
        (
            "storage_operations_total",
            &[("operation", "put"), ("backend", "local")][..],
        ),
    ] {
        assert_eq!(value(&unzipped, name, labels), value(&plain, name, labels));
    }
    assert_eq!(value(&plain, "messages_received_total", &[]), 6.0);
    // Prometheus's own header, and refusals.
    let (_, h, _) = get_with_headers(
        agent.metrics_addr,
        "/metrics",
        "Accept-Encoding: gzip, deflate, br;q=0.9\r\n",
    );
    assert_eq!(header(&h, "content-encoding").as_deref(), Some("gzip"));
    for refused in [
        "Accept-Encoding: identity\r\n",
        "Accept-Encoding: gzip;q=0\r\n",
    ] {
        let (_, h, _) = get_with_headers(agent.metrics_addr, "/metrics", refused);
        assert_eq!(header(&h, "content-encoding"), None, "{refused}");
    }
}

#[test]
fn scrapes_are_counted_by_code_and_405_names_the_allowed_methods() {
    let agent = Agent::start();
    for _ in 0..3 {
        agent.scrape();
    }
    let mut stream = TcpStream::connect(agent.metrics_addr).unwrap();
    write!(
        stream,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("\r\nallow: get, head\r\n"),
        "{raw}"
    );
    // Not scrapes: other paths.
    agent.http_get("/health");
    agent.http_get("/nope");
    // The fourth scrape counts itself.
    let text = agent.scrape();
    assert_eq!(
        value(&text, "agent_metrics_scrapes_total", &[("code", "200")]),
        4.0
    );
    assert_eq!(
        value(&text, "agent_metrics_scrapes_total", &[("code", "405")]),
        1.0
    );
    assert_eq!(
        value(&text, "agent_metrics_scrapes_total", &[("code", "401")]),
        0.0
    );
    assert_eq!(
        value(&text, "agent_metrics_scrapes_total", &[("code", "403")]),
        0.0
    );
}
