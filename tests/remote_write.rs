//! Remote write end to end: the real agent pushing to Debian's Prometheus
//! 2.42 (`--web.enable-remote-write-receiver`), through an outage of that
//! Prometheus, and to a receiver the test scripts (500, 429 with
//! `Retry-After`, 400, an answer past the timeout, a connection reset;
//! HTTPS with basic auth or a bearer token).

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const RECEIVER_FLAG: &str = "--web.enable-remote-write-receiver";

/// An agent pushing to `url` every `interval`, with more settings.
fn pushing_agent(url: &str, interval: &str, more: &[(&str, &str)]) -> Agent {
    let mut opts = AgentOptions::default()
        .env("AGENT_METRICS__REMOTE_WRITE__URL", url)
        .env("AGENT_METRICS__REMOTE_WRITE__INTERVAL", interval);
    for (k, v) in more {
        opts = opts.env(k, v);
    }
    Agent::start_with(opts)
}

fn receiver_prometheus(flags: &[&str]) -> Option<Prometheus> {
    require_bin("prometheus")?;
    Prometheus::start_with_flags(tempfile::tempdir().unwrap(), "global: {}\n", flags)
}

fn write_url(prom: &Prometheus) -> String {
    format!("http://{}/api/v1/write", prom.addr)
}

fn counter(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&agent.scrape(), name, labels).unwrap_or(0.0)
}

#[test]
fn a_push_only_agent_opens_no_port_and_prometheus_sees_exact_counts_with_its_labels() {
    let Some(prom) = receiver_prometheus(&[RECEIVER_FLAG]) else {
        return;
    };
    let mut agent = pushing_agent(
        &write_url(&prom),
        "1s",
        &[
            ("AGENT_METRICS__LISTEN", "false"),
            ("AGENT_NODE__ID", "edge-7"),
            (
                "AGENT_METRICS__REMOTE_WRITE__EXTERNAL_LABELS__SITE",
                "lisbon",
            ),
        ],
    );
    agent.wait_for_log("metrics.listen is false");
    assert!(
        TcpStream::connect(agent.metrics_addr).is_err(),
        "the metrics port is open"
    );
    agent.connect().known_traffic(20, 15, 5, 3);
    let labels = r#"{instance="edge-7",job="agent",site="lisbon"}"#;
    let series = prom.wait_for_one(&format!("messages_received_total{labels}"), 43.0);
    assert_eq!(
        series_labels(&series),
        [("instance", "edge-7"), ("job", "agent"), ("site", "lisbon")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into()
    );
    let unknown = r#"{instance="edge-7",job="agent",site="lisbon",reason="unknown_op"}"#;
    prom.wait_for_one(&format!("messages_failed_total{unknown}"), 3.0);
    prom.wait_for_one(
        &format!("message_processing_duration_seconds_count{labels}"),
        43.0,
    );
    let inf = r#"{instance="edge-7",job="agent",site="lisbon",le="+Inf"}"#;
    prom.wait_for_one(
        &format!("message_processing_duration_seconds_bucket{inf}"),
        43.0,
    );
    // 19 bounds plus +Inf, named and labelled as a scrape would store them.
    let buckets = prom.query(&format!(
        "message_processing_duration_seconds_bucket{labels}"
    ));
    assert_eq!(buckets.len(), 20, "{buckets:?}");
    prom.wait_for_one(
        r#"storage_operations_total{operation="put",backend="local",job="agent"}"#,
        20.0,
    );
    // Its own series arrive with the rest.
    let sent = prom.query(&format!("agent_remote_write_samples_sent_total{labels}"));
    assert_eq!(sent.len(), 1, "{sent:?}");
}

#[test]
fn samples_taken_while_prometheus_is_down_arrive_with_their_own_timestamps() {
    let Some(mut prom) = receiver_prometheus(&[RECEIVER_FLAG]) else {
        return;
    };
    let agent = pushing_agent(&write_url(&prom), "1s", &[("AGENT_NODE__ID", "outage")]);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let mut peer = agent.connect();
        std::thread::spawn(move || {
            assert_eq!(peer.put("k", "v")["ok"], true);
            sent.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) {
                assert_eq!(peer.get("k")["value"], "v");
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let selector = r#"messages_received_total{instance="outage",job="agent"}"#;
    // Up and receiving before the outage.
    assert!(
        wait_until(|| !prom.query(selector).is_empty()),
        "{}",
        prom.log()
    );

    let down_at = now_secs();
    prom.shut_down();
    // The outage itself: its length is the scenario, not a wait for a state.
    std::thread::sleep(Duration::from_secs(10));
    prom.restart();
    let up_at = now_secs();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let total = sent.load(Ordering::SeqCst) as f64;

    prom.wait_for_one(selector, total);
    // Every sample of the series from just before the outage to now.
    let span = (now_secs() - down_at + 5.0).ceil() as u64;
    let answer = prom.api(&format!(
        "/api/v1/query?query={}",
        percent_encode(&format!("{selector}[{span}s]"))
    ));
    let values = answer["data"]["result"][0]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let points: Vec<(f64, f64)> = values
        .iter()
        .map(|v| (v[0].as_f64().unwrap(), sample_number(&v[1])))
        .collect();
    let inside: Vec<&(f64, f64)> = points
        .iter()
        .filter(|(t, _)| *t > down_at + 0.5 && *t < up_at - 0.5)
        .collect();
    // One snapshot a second through a 10 s outage (the margins leave 9 s;
    // a loaded machine may delay a tick or two).
    assert!(
        inside.len() >= 7,
        "{} samples inside the outage {down_at}..{up_at}: {points:?}",
        inside.len()
    );
    assert!(
        points
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "timestamps and counts must rise: {points:?}"
    );
    let mid = inside[inside.len() / 2].1;
    assert!(
        mid > 0.0 && mid < total,
        "mid-outage count {mid} of {total}"
    );
    let refused: f64 = ["connection_error", "server_error", "timeout"]
        .iter()
        .map(|r| {
            counter(
                &agent,
                "agent_remote_write_requests_total",
                &[("result", r)],
            )
        })
        .sum();
    assert!(
        refused >= 1.0,
        "the outage was not noticed:\n{}",
        agent.scrape()
    );
    assert_eq!(
        counter(&agent, "agent_remote_write_samples_dropped_total", &[]),
        0.0
    );
    assert_eq!(
        counter(&agent, "agent_remote_write_samples_failed_total", &[]),
        0.0
    );
}

#[test]
fn native_histograms_arrive_as_native_histograms() {
    let Some(prom) = receiver_prometheus(&[RECEIVER_FLAG, "--enable-feature=native-histograms"])
    else {
        return;
    };
    let agent = pushing_agent(
        &write_url(&prom),
        "1s",
        &[
            ("AGENT_NODE__ID", "native"),
            ("AGENT_METRICS__NATIVE_HISTOGRAMS__ENABLED", "true"),
        ],
    );
    agent.connect().known_traffic(30, 20, 10, 0);
    prom.wait_for_one(
        r#"histogram_count(message_processing_duration_seconds{instance="native"})"#,
        60.0,
    );
    for (op, n) in [("put", 30.0), ("get", 20.0), ("delete", 10.0)] {
        prom.wait_for_one(
            &format!(r#"histogram_count(storage_operation_duration_seconds{{operation="{op}"}})"#),
            n,
        );
    }
    let p99 = prom.query(
        r#"histogram_quantile(0.99, message_processing_duration_seconds{instance="native"})"#,
    );
    let p99 = sample_number(&p99[0]["value"][1]);
    assert!(p99.is_finite() && p99 > 0.0, "p99 {p99}");
    assert!(prom
        .query("message_processing_duration_seconds_bucket")
        .is_empty());
    assert!(prom
        .query("message_processing_duration_seconds_count")
        .is_empty());
}

/// Timestamps of every sample in a request.
fn timestamps(r: &Received) -> BTreeSet<i64> {
    r.request
        .timeseries
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.timestamp))
        .collect()
}

#[test]
fn a_faulty_receiver_gets_retries_as_prometheus_would_and_the_counters_are_exact() {
    let receiver = Receiver::start(vec![
        Answer::Status(500),
        Answer::Throttle("2".into()),
        Answer::Status(400),
        Answer::Slow(Duration::from_secs(3)),
        Answer::Reset,
    ]);
    let agent = pushing_agent(
        &receiver.url(),
        "1s",
        &[("AGENT_METRICS__REMOTE_WRITE__TIMEOUT", "1s")],
    );
    assert!(
        wait_until(|| receiver
            .received()
            .iter()
            .filter(|r| r.answer == "200")
            .count()
            >= 2),
        "{:?}\n{}",
        receiver.answers(),
        agent.log()
    );
    let got = receiver.received();
    let answers: Vec<&str> = got.iter().take(6).map(|r| r.answer.as_str()).collect();
    assert_eq!(answers, ["500", "429", "400", "slow", "reset", "200"]);

    // 500 and 429 retry the same oldest snapshot; 429 after Retry-After.
    let first = |r: &Received| timestamps(r).first().copied();
    assert_eq!(first(&got[0]), first(&got[1]));
    assert_eq!(first(&got[1]), first(&got[2]));
    let waited = got[2].at - got[1].at;
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After: 2 honoured? {waited:?}"
    );
    // The 400 is given up: none of its samples is ever sent again.
    let refused = timestamps(&got[2]);
    for later in &got[3..] {
        assert!(
            timestamps(later).is_disjoint(&refused),
            "a refused sample came back"
        );
    }
    // Past the timeout, and after a reset, the same batch is tried again.
    assert_eq!(first(&got[3]), first(&got[4]));
    assert_eq!(first(&got[4]), first(&got[5]));

    for r in &got {
        assert_eq!(r.headers["content-encoding"], "snappy");
        assert_eq!(r.headers["content-type"], "application/x-protobuf");
        assert_eq!(r.headers["x-prometheus-remote-write-version"], "0.1.0");
        assert!(
            r.headers["user-agent"].starts_with("agent/"),
            "{:?}",
            r.headers
        );
        for series in &r.request.timeseries {
            let names: Vec<&str> = series.labels.iter().map(|l| l.name.as_str()).collect();
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "labels unsorted: {names:?}"
            );
            assert!(
                series
                    .samples
                    .windows(2)
                    .all(|w| w[0].timestamp < w[1].timestamp),
                "samples unsorted in {names:?}"
            );
        }
    }

    // The counters, against what the receiver saw: exact once no push is
    // half-way between the two (pushes go on every second).
    let mut last = String::new();
    let exact = wait_until(|| {
        let got = receiver.received();
        let page = agent.scrape();
        let v = |name: &str, labels: &[(&str, &str)]| sample(&page, name, labels).unwrap_or(-1.0);
        let requests = |result: &str| v("agent_remote_write_requests_total", &[("result", result)]);
        let ok: Vec<&Received> = got.iter().filter(|r| r.answer == "200").collect();
        let accepted: usize = ok.iter().map(|r| r.samples()).sum();
        let pending = v("agent_remote_write_samples_pending", &[]);
        let taken = v("agent_remote_write_samples_total", &[]);
        let sent = v("agent_remote_write_samples_sent_total", &[]);
        let failed = v("agent_remote_write_samples_failed_total", &[]);
        last = format!(
            "requests: {:?}; accepted {accepted}, sent {sent}, failed {failed}, taken {taken}, pending {pending}",
            ["success", "server_error", "throttled", "rejected", "timeout", "connection_error"]
                .map(|r| (r, requests(r)))
        );
        requests("success") == ok.len() as f64
            && requests("server_error") == 1.0
            && requests("throttled") == 1.0
            && requests("rejected") == 1.0
            && requests("timeout") == 1.0
            && requests("connection_error") == 1.0
            && sent == accepted as f64
            && failed == got[2].samples() as f64
            && v("agent_remote_write_samples_dropped_total", &[]) == 0.0
            && taken == sent + failed + pending
    });
    assert!(exact, "{last}\n{}", agent.log());
    let log = agent.log();
    assert!(log.contains("refused samples"), "{log}");
    // The receiver's answer is logged escaped, its newline as `\n`.
    assert!(log.contains(r"bad request: out of order sample\n"), "{log}");
}

#[test]
fn beyond_max_pending_the_oldest_samples_are_dropped_and_counted() {
    const MAX: usize = 500;
    let receiver = Receiver::start(Vec::new());
    receiver.set_fallback(Answer::Status(503));
    let agent = pushing_agent(
        &receiver.url(),
        "250ms",
        &[("AGENT_METRICS__REMOTE_WRITE__MAX_PENDING", &MAX.to_string())],
    );
    let mut pending_seen = Vec::new();
    assert!(wait_until(|| {
        let page = agent.scrape();
        pending_seen.push(sample(&page, "agent_remote_write_samples_pending", &[]).unwrap_or(0.0));
        sample(&page, "agent_remote_write_samples_dropped_total", &[]).unwrap_or(0.0)
            > 2.0 * MAX as f64
    }));
    receiver.set_fallback(Answer::Status(200));
    assert!(wait_until(|| receiver
        .received()
        .iter()
        .any(|r| r.answer == "200")));
    let got = receiver.received();
    let refused_newest = got
        .iter()
        .filter(|r| r.answer == "503")
        .flat_map(timestamps)
        .max()
        .unwrap();
    let backlog = got.iter().find(|r| r.answer == "200").unwrap();
    // Exactly `max_pending` samples waited, and they are the newest.
    assert_eq!(backlog.samples(), MAX);
    assert!(timestamps(backlog).last().copied().unwrap() >= refused_newest);
    assert!(
        pending_seen.iter().all(|&p| p <= MAX as f64),
        "{pending_seen:?}"
    );

    let mut last = String::new();
    let exact = wait_until(|| {
        let got = receiver.received();
        let page = agent.scrape();
        let v = |name: &str| sample(&page, name, &[]).unwrap_or(-1.0);
        let accepted: usize = got
            .iter()
            .filter(|r| r.answer == "200")
            .map(Received::samples)
            .sum();
        let (taken, sent, dropped, pending) = (
            v("agent_remote_write_samples_total"),
            v("agent_remote_write_samples_sent_total"),
            v("agent_remote_write_samples_dropped_total"),
            v("agent_remote_write_samples_pending"),
        );
        last = format!(
            "taken {taken}, sent {sent}, accepted {accepted}, dropped {dropped}, pending {pending}"
        );
        sent == accepted as f64
            && taken == sent + dropped + pending
            && v("agent_remote_write_samples_failed_total") == 0.0
    });
    assert!(exact, "{last}");
    // Oldest first: each accepted request is newer than the one before.
    let accepted: Vec<BTreeSet<i64>> = receiver
        .received()
        .iter()
        .filter(|r| r.answer == "200")
        .map(timestamps)
        .collect();
    for w in accepted.windows(2) {
        assert!(w[0].last() <= w[1].first(), "out of order: {w:?}");
    }
    assert!(agent.log().contains("max_pending reached"));
}

#[test]
fn https_with_basic_auth_or_a_bearer_token() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(dir.path(), "rw");
    let leaf = ca.leaf(dir.path(), "receiver");
    let password = "s3cret-pw-9f2";
    std::fs::write(dir.path().join("password"), format!("{password}\n")).unwrap();
    let token = "tok-51ad07";
    std::fs::write(dir.path().join("token"), token).unwrap();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("pusher:{password}"))
    );
    let ca_file = ca.cert_file.to_str().unwrap().to_string();
    let password_file = dir.path().join("password").to_str().unwrap().to_string();
    let token_file = dir.path().join("token").to_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");

    let cases: [(&str, Vec<(&str, &str)>); 2] = [
        (
            basic.as_str(),
            vec![
                (
                    "AGENT_METRICS__REMOTE_WRITE__BASIC_AUTH__USERNAME",
                    "pusher",
                ),
                (
                    "AGENT_METRICS__REMOTE_WRITE__BASIC_AUTH__PASSWORD_FILE",
                    &password_file,
                ),
            ],
        ),
        (
            bearer.as_str(),
            vec![(
                "AGENT_METRICS__REMOTE_WRITE__BEARER_TOKEN_FILE",
                &token_file,
            )],
        ),
    ];
    for (authorization, env) in cases {
        let receiver = Receiver::start_tls(Vec::new(), &leaf, Some(authorization.to_string()));
        let mut env = env;
        env.push(("AGENT_METRICS__REMOTE_WRITE__TLS__CA_FILE", &ca_file));
        let agent = pushing_agent(&receiver.url(), "1s", &env);
        agent.connect().known_traffic(4, 0, 0, 0);
        assert!(
            wait_until(|| {
                receiver.received().iter().any(|r| {
                    r.answer == "200" && r.last_value("messages_received_total") == Some(4.0)
                })
            }),
            "{:?}\n{}",
            receiver
                .received()
                .iter()
                .map(|r| &r.answer)
                .collect::<Vec<_>>(),
            agent.log()
        );
        assert!(receiver.received().iter().all(|r| r.answer == "200"));
        let log = agent.log();
        assert!(!log.contains(password) && !log.contains(token), "{log}");
        let url = receiver.url();
        env.push(("AGENT_METRICS__REMOTE_WRITE__URL", &url));
        let (code, stdout, stderr) = run_agent(dir.path(), &["check-config"], &env);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("remote_write"), "{stdout}");
        assert!(
            !stdout.contains(password) && !stdout.contains(token),
            "{stdout}"
        );
    }
}

#[test]
fn shutdown_pushes_the_last_counts() {
    let receiver = Receiver::start(Vec::new());
    // One snapshot at start; the next would be an hour away.
    let mut agent = pushing_agent(&receiver.url(), "1h", &[]);
    assert!(wait_until(|| !receiver.received().is_empty()));
    agent.connect().known_traffic(7, 5, 0, 0);
    assert!(agent.terminate().success(), "{}", agent.log());
    let got = receiver.received();
    let last = got.last().unwrap();
    assert_eq!(last.answer, "200");
    assert_eq!(
        last.last_value("messages_received_total"),
        Some(12.0),
        "{}",
        agent.log()
    );
}
