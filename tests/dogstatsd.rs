//! The exporter is chosen by configuration only: `metrics.exporter:
//! dogstatsd` pushes the same metrics over UDP. A real UDP socket in the
//! test receives them and finds the same counts the Prometheus endpoint
//! shows for the same traffic; `metrics.enabled: false` sends nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use agent::telemetry::defs::{Kind, Source};
use agent::telemetry::METRICS;
use common::*;

const PUTS: usize = 12;
const GETS: usize = 7;
const DELETES: usize = 5;
const UNKNOWN_OPS: usize = 2;
const TOTAL: usize = PUTS + GETS + DELETES + UNKNOWN_OPS;
const REASONS: [&str; 5] = ["parse", "invalid", "unknown_op", "too_large", "storage"];
const OPERATIONS: [&str; 3] = ["get", "put", "delete"];

/// Series → value: the agent's counters, and `<histogram>#count` for the
/// number of observations of each histogram series.
type Counts = BTreeMap<String, f64>;

/// `name{k=v,...}` with labels sorted, the same for both exporters.
fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

fn def(name: &str) -> Option<&'static agent::telemetry::defs::MetricDef> {
    METRICS.iter().find(|d| d.name == name)
}

fn is_agent_counter(name: &str) -> bool {
    def(name).is_some_and(|d| d.source == Source::Agent && d.kind == Kind::Counter)
}

fn is_agent_histogram(name: &str) -> bool {
    def(name).is_some_and(|d| d.source == Source::Agent && d.kind == Kind::Histogram)
}

/// What the known traffic must produce, under any exporter.
/// The `reason` values of `agent_peer_connections_denied_total`.
const DENY_REASONS: [&str; 5] = [
    "not_allowed",
    "tls_no_certificate",
    "tls_bad_certificate",
    "tls_timeout",
    "tls_error",
];

fn expected() -> Counts {
    let mut want = Counts::new();
    want.insert(series_key("messages_received_total", &[]), TOTAL as f64);
    want.insert(series_key("agent_connections_rejected_total", &[]), 0.0);
    for reason in DENY_REASONS {
        want.insert(
            series_key("agent_peer_connections_denied_total", &[("reason", reason)]),
            0.0,
        );
    }
    want.insert(
        series_key("agent_storage_panics_total", &[("backend", "local")]),
        0.0,
    );
    want.insert(series_key("agent_connections_evicted_total", &[]), 0.0);
    want.insert(series_key("agent_connections_idle_closed_total", &[]), 0.0);
    want.insert(
        series_key("agent_listener_sockets_full_total", &[("listener", "peer")]),
        0.0,
    );
    for reason in REASONS {
        let n = if reason == "unknown_op" {
            UNKNOWN_OPS
        } else {
            0
        };
        want.insert(
            series_key("messages_failed_total", &[("reason", reason)]),
            n as f64,
        );
    }
    for (op, n) in [("put", PUTS), ("get", GETS), ("delete", DELETES)] {
        let labels = [("operation", op), ("backend", "local")];
        want.insert(series_key("storage_operations_total", &labels), n as f64);
        want.insert(series_key("storage_operation_errors_total", &labels), 0.0);
        want.insert(
            series_key("storage_operation_duration_seconds#count", &labels),
            n as f64,
        );
    }
    want.insert(
        series_key("message_processing_duration_seconds#count", &[]),
        TOTAL as f64,
    );
    want
}

/// N puts, M gets (all hits), K deletes and a few unknown ops on one peer
/// connection; every reply is checked, so all of it was recorded.
fn traffic(agent: &Agent) {
    agent
        .connect()
        .known_traffic(PUTS, GETS, DELETES, UNKNOWN_OPS);
}

/// The counts in a Prometheus scrape.
fn counts_from_scrape(text: &str) -> Counts {
    let mut counts = Counts::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels: Vec<(&str, &str)> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once('=').expect("label");
                        (k, v.trim_matches('"'))
                    })
                    .collect();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        let value: f64 = value.parse().expect("sample value");
        if is_agent_counter(name) {
            counts.insert(series_key(name, &labels), value);
        } else if let Some(base) = name
            .strip_suffix("_count")
            .filter(|b| is_agent_histogram(b))
        {
            counts.insert(series_key(&format!("{base}#count"), &labels), value);
        }
    }
    counts
}

/// One DogStatsD line: `name:v1[:v2...]|type[|@rate][|#k:v,...][|Tts]`.
#[derive(Debug)]
struct Line {
    name: String,
    values: Vec<f64>,
    kind: String,
    tags: Vec<(String, String)>,
    raw: String,
}

fn parse_line(raw: &str) -> Line {
    let mut fields = raw.split('|');
    let (name, values) = fields
        .next()
        .unwrap()
        .split_once(':')
        .unwrap_or_else(|| panic!("{raw:?}"));
    let values = values
        .split(':')
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("value {v:?} in {raw:?}: {e}"))
        })
        .collect();
    let kind = fields
        .next()
        .unwrap_or_else(|| panic!("no type in {raw:?}"))
        .to_string();
    let mut tags = Vec::new();
    for field in fields {
        // No sampling and conservative aggregation: no `@rate` and no `T`.
        let tag_list = field
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("unexpected field {field:?} in {raw:?}"));
        for tag in tag_list.split(',') {
            let (k, v) = tag
                .split_once(':')
                .unwrap_or_else(|| panic!("tag {tag:?} in {raw:?}"));
            tags.push((k.to_string(), v.to_string()));
        }
    }
    Line {
        name: name.to_string(),
        values,
        kind,
        tags,
        raw: raw.to_string(),
    }
}

/// Everything a UDP socket received from the DogStatsD exporter.
#[derive(Default)]
struct Received {
    lines: Vec<Line>,
}

impl Received {
    /// Counters summed over flushes (each flush sends the delta since the
    /// previous one), and the number of values of each distribution.
    fn counts(&self) -> Counts {
        let mut counts = Counts::new();
        for line in &self.lines {
            let tags: Vec<(&str, &str)> = self.tags(line);
            if is_agent_counter(&line.name) {
                *counts.entry(series_key(&line.name, &tags)).or_default() +=
                    line.values.iter().sum::<f64>();
            } else if is_agent_histogram(&line.name) {
                let key = series_key(&format!("{}#count", line.name), &tags);
                *counts.entry(key).or_default() += line.values.len() as f64;
            }
        }
        counts
    }

    fn tags<'a>(&self, line: &'a Line) -> Vec<(&'a str, &'a str)> {
        line.tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// The latest value of a gauge series.
    fn gauge(&self, name: &str, tags: &[(&str, &str)]) -> Option<f64> {
        let key = series_key(name, tags);
        self.lines
            .iter()
            .rev()
            .find(|l| l.name == name && series_key(name, &self.tags(l)) == key)
            .and_then(|l| l.values.last().copied())
    }

    fn dump(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.raw.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Receives datagrams until the counts equal `want` and, after that, a flush
/// reports no new messages (`messages_received_total:0|c`, sent once when a
/// counter goes idle), which shows nothing more was on its way. Returns what
/// arrived by then, or by the end of the wait.
fn collect_settled(socket: &UdpSocket, want: &Counts) -> Received {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut received = Received::default();
    let mut matched_at: Option<usize> = None;
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = std::str::from_utf8(&buf[..n]).expect("UTF-8 datagram");
                received
                    .lines
                    .extend(text.lines().filter(|l| !l.is_empty()).map(parse_line));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
        if matched_at.is_none() && received.counts() == *want {
            matched_at = Some(received.lines.len());
        }
        if let Some(at) = matched_at {
            let idle = received.lines[at..]
                .iter()
                .any(|l| l.name == "messages_received_total" && l.values == [0.0]);
            if idle {
                break;
            }
        }
    }
    received
}

fn dogstatsd_agent(socket: &UdpSocket, enabled: bool) -> Agent {
    Agent::start_with(
        AgentOptions::default()
            .env("AGENT_METRICS__ENABLED", enabled)
            .env("AGENT_METRICS__EXPORTER", "dogstatsd")
            .env(
                "AGENT_METRICS__DOGSTATSD__ADDRESS",
                socket.local_addr().unwrap(),
            ),
    )
}

#[test]
fn both_exporters_report_the_same_counts_for_the_same_traffic() {
    let want = expected();

    // Prometheus: scraped from /metrics.
    let agent = Agent::start();
    traffic(&agent);
    let scraped = counts_from_scrape(&agent.scrape());
    // The metrics endpoint's own counters exist only where there is one.
    let mut want_prometheus = want.clone();
    for name in [
        "agent_http_requests_unauthorized_total",
        "agent_http_tls_handshake_failures_total",
    ] {
        want_prometheus.insert(series_key(name, &[]), 0.0);
    }
    want_prometheus.insert(
        series_key(
            "agent_listener_sockets_full_total",
            &[("listener", "metrics")],
        ),
        0.0,
    );
    for (code, n) in [("200", 1.0), ("401", 0.0), ("403", 0.0), ("405", 0.0)] {
        // The one scrape counts itself.
        want_prometheus.insert(
            series_key("agent_metrics_scrapes_total", &[("code", code)]),
            n,
        );
    }
    assert_eq!(scraped, want_prometheus, "Prometheus exporter");
    drop(agent);

    // DogStatsD: the same call sites, pushed to a real UDP socket.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let agent = dogstatsd_agent(&socket, true);
    assert!(
        agent.log().contains("sending metrics to DogStatsD"),
        "{}",
        agent.log()
    );
    let refused =
        TcpStream::connect(agent.metrics_addr).expect_err("no HTTP endpoint with DogStatsD");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    traffic(&agent);
    let received = collect_settled(&socket, &want);
    assert_eq!(
        received.counts(),
        want,
        "DogStatsD exporter; received:\n{}",
        received.dump()
    );
    // The same numbers as the scrape, but for the endpoint's own counters.
    let mut scraped_common = scraped.clone();
    scraped_common.retain(|k, _| {
        !k.starts_with("agent_http_")
            && !k.starts_with("agent_metrics_scrapes")
            && k != "agent_listener_sockets_full_total{listener=metrics}"
    });
    assert_eq!(received.counts(), scraped_common, "the exporters disagree");

    // Each metric arrives with the DogStatsD type of its definition:
    // counters `c`, gauges `g`, histograms as distributions `d`.
    let mut names = BTreeSet::new();
    for line in &received.lines {
        let def = def(&line.name).unwrap_or_else(|| panic!("undefined metric in {:?}", line.raw));
        let kind = match def.kind {
            Kind::Counter => "c",
            Kind::Gauge => "g",
            Kind::Histogram => "d",
        };
        assert_eq!(line.kind, kind, "{}", line.raw);
        let mut tags: Vec<&str> = line.tags.iter().map(|(k, _)| k.as_str()).collect();
        let mut labels = def.labels.to_vec();
        tags.sort();
        labels.sort();
        assert_eq!(tags, labels, "{}", line.raw);
        names.insert(def.name);
    }
    for name in [
        "agent_build_info",
        "agent_peers_connected",
        "process_cpu_usage",
        "process_memory_bytes",
    ] {
        assert!(
            names.contains(name),
            "{name} never arrived:\n{}",
            received.dump()
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        received.gauge("agent_build_info", &[("version", version)]),
        Some(1.0)
    );
    for op in OPERATIONS {
        let durations: Vec<f64> = received
            .lines
            .iter()
            .filter(|l| l.name == "storage_operation_duration_seconds")
            .filter(|l| l.tags.contains(&("operation".to_string(), op.to_string())))
            .flat_map(|l| l.values.clone())
            .collect();
        assert!(
            durations.iter().all(|d| *d > 0.0 && *d < 10.0),
            "{op}: {durations:?}"
        );
    }
}

/// The inodes of the sockets `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the agent's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// Rows of /proc/net/{udp,udp6,tcp,tcp6} owned by one of `inodes`:
/// (table, local address, state).
fn sockets_of(inodes: &BTreeSet<String>) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for table in ["udp", "udp6", "tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) {
                rows.push((table.to_string(), f[1].to_string(), f[3].to_string()));
            }
        }
    }
    rows
}

/// The port of a /proc/net local address (`0100007F:1F90`).
fn port_of(local: &str) -> u16 {
    u16::from_str_radix(local.rsplit(':').next().unwrap(), 16).unwrap()
}

#[test]
fn disabled_metrics_send_nothing_even_with_dogstatsd_configured() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut disabled = dogstatsd_agent(&silent, false);
    disabled.wait_for_log("Metrics endpoint disabled");

    // A control agent, enabled, sends to its own socket: its flushes bound
    // the observation window, so the window adapts to a slow machine
    // instead of being a guessed sleep.
    let control_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let control = dogstatsd_agent(&control_socket, true);

    traffic(&disabled);
    traffic(&control);
    // Settled means a flush after the traffic and another one after that:
    // more than one full flush interval since the disabled agent's traffic.
    let received = collect_settled(&control_socket, &expected());
    assert_eq!(
        received.counts(),
        expected(),
        "control received:\n{}",
        received.dump()
    );

    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    match silent.recv_from(&mut buf) {
        Ok((n, from)) => panic!(
            "metrics.enabled=false sent {from:?} a datagram: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }

    // No network use at all: no UDP socket, and the only listening socket is
    // the peer port (the control agent, enabled, does hold a UDP socket).
    let disabled_sockets = sockets_of(&socket_inodes(disabled.pid()));
    let udp: Vec<_> = disabled_sockets
        .iter()
        .filter(|(t, _, _)| t.starts_with("udp"))
        .collect();
    assert!(udp.is_empty(), "disabled agent holds UDP sockets: {udp:?}");
    let listening: Vec<u16> = disabled_sockets
        .iter()
        .filter(|(t, _, state)| t.starts_with("tcp") && state == "0A")
        .map(|(_, local, _)| port_of(local))
        .collect();
    assert_eq!(
        listening,
        vec![disabled.peer_addr.port()],
        "{disabled_sockets:?}"
    );
    let control_sockets = sockets_of(&socket_inodes(control.pid()));
    assert!(
        control_sockets.iter().any(|(t, _, _)| t.starts_with("udp")),
        "control check: the enabled agent's UDP socket must be visible: {control_sockets:?}"
    );

    let err = TcpStream::connect(disabled.metrics_addr).expect_err("no metrics endpoint");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let log = disabled.log();
    assert!(!log.contains("sending metrics to DogStatsD"), "{log}");
    assert!(!log.contains("metrics endpoint listening"), "{log}");
}

/// Native histograms are a Prometheus scrape feature: with DogStatsD the
/// setting is accepted, does nothing, and says so.
#[test]
fn native_histograms_with_dogstatsd_are_named_as_having_no_effect() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut agent = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_METRICS__EXPORTER", "dogstatsd")
            .env("AGENT_METRICS__NATIVE_HISTOGRAMS__ENABLED", "true")
            .env(
                "AGENT_METRICS__DOGSTATSD__ADDRESS",
                socket.local_addr().unwrap(),
            ),
    );
    agent.wait_for_log(
        "metrics.native_histograms.enabled has no effect with metrics.exporter: dogstatsd",
    );
}
