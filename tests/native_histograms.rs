//! Native histograms end to end: the real agent with
//! `metrics.native_histograms.enabled`, scraped by Debian's Prometheus 2.42
//! with `--enable-feature=native-histograms` (which asks for the protobuf
//! format) and by one without it (which asks for text), both at once.

mod common;

use std::collections::BTreeMap;

use common::*;

const PUTS: usize = 30;
const GETS: usize = 20;
const DELETES: usize = 10;
const MESSAGES: usize = PUTS + GETS + DELETES;

const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

fn native_agent() -> Agent {
    Agent::start_with(
        AgentOptions::default().env("AGENT_METRICS__NATIVE_HISTOGRAMS__ENABLED", "true"),
    )
}

fn scrape_config(agent: &Agent) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['{}']\n",
        agent.metrics_addr
    )
}

#[test]
fn prometheus_stores_native_histograms_and_a_classic_scraper_sees_no_change() {
    if require_bin("prometheus").is_none() {
        return;
    }
    let agent = native_agent();
    let native = Prometheus::start_with_flags(
        tempfile::tempdir().unwrap(),
        &scrape_config(&agent),
        &["--enable-feature=native-histograms"],
    )
    .expect("prometheus is installed");
    let classic = Prometheus::start(&scrape_config(&agent)).expect("prometheus is installed");

    agent.connect().known_traffic(PUTS, GETS, DELETES, 0);

    // The flagged server holds a native histogram whose count is exact.
    native.wait_for_one(
        "histogram_count(message_processing_duration_seconds)",
        MESSAGES as f64,
    );
    let stored = native.query("message_processing_duration_seconds");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let histogram = &stored[0]["histogram"][1];
    assert_eq!(histogram["count"], MESSAGES.to_string(), "{stored:?}");
    assert!(
        histogram["buckets"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{stored:?}"
    );
    let p99 = native.query("histogram_quantile(0.99, message_processing_duration_seconds)");
    assert_eq!(p99.len(), 1, "{p99:?}");
    let p99 = sample_number(&p99[0]["value"][1]);
    assert!(p99.is_finite() && p99 > 0.0 && p99 < 10.0, "{p99}");
    // A native series has no classic `_bucket` series beside it.
    assert_eq!(
        native.query("message_processing_duration_seconds_bucket"),
        Vec::<serde_json::Value>::new()
    );
    for (operation, n) in [("put", PUTS), ("get", GETS), ("delete", DELETES)] {
        let series = native.wait_for_one(
            &format!(
                "histogram_count(storage_operation_duration_seconds{{operation=\"{operation}\"}})"
            ),
            n as f64,
        );
        assert_eq!(series["metric"]["backend"], "local", "{series}");
    }
    // Counters come through the protobuf scrape unchanged.
    native.wait_for_one("messages_received_total", MESSAGES as f64);

    // The server without the flag scrapes text: classic series, exact.
    classic.wait_for_one("message_processing_duration_seconds_count", MESSAGES as f64);
    classic.wait_for_one(
        "message_processing_duration_seconds_bucket{le=\"+Inf\"}",
        MESSAGES as f64,
    );
    let buckets = classic.query("message_processing_duration_seconds_bucket");
    assert_eq!(buckets.len(), 20, "19 bounds and +Inf: {buckets:?}");
    assert_eq!(
        classic.query("message_processing_duration_seconds"),
        Vec::<serde_json::Value>::new()
    );
    // SlowMessageProcessing's expression (threshold aside) finds the p99
    // on both servers, from whichever kind each stores, once both have
    // scraped a rise (a rate of nothing is no quantile).
    agent.connect().known_traffic(PUTS, 0, 0, 0);
    let slow = slow_message_processing_expr();
    for (name, prom) in [("native", &native), ("classic", &classic)] {
        let mut p99 = Vec::new();
        let found = wait_until(|| {
            p99 = prom.query(&slow);
            p99.len() == 1
        });
        assert!(found, "{name}: {slow}: {p99:?}");
        assert_eq!(p99[0]["metric"]["instance"], agent.metrics_addr.to_string());
    }
    // The dashboard's native-histogram panels have data there.
    let instance = agent.metrics_addr.to_string().replace('.', r"\\.");
    let panels: Vec<String> = dashboard_exprs()
        .into_iter()
        .filter(|e| selects_native_histograms(e))
        .map(|e| {
            e.replace("$instance", &instance)
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert_eq!(panels.len(), 4, "{panels:?}");
    for expr in &panels {
        let mut result = Vec::new();
        let answered = wait_until(|| {
            result = native.query(expr);
            !result.is_empty()
        });
        assert!(answered, "no data for {expr}\n{}", native.log());
    }
    for (name, prom) in [("native", &native), ("classic", &classic)] {
        let targets = prom.api("/api/v1/targets?state=active");
        let active = &targets["data"]["activeTargets"][0];
        assert_eq!(active["health"], "up", "{name}: {targets}");
        assert_eq!(active["lastError"], "", "{name}: {targets}");
    }
}

/// docs/alerts.yml's SlowMessageProcessing expression, with its threshold
/// lowered to 0 so that it returns the p99 whatever it is.
fn slow_message_processing_expr() -> String {
    let rules: serde_yaml::Value = serde_yaml::from_str(&read_doc("alerts.yml")).unwrap();
    let rule = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "SlowMessageProcessing")
        .expect("SlowMessageProcessing in docs/alerts.yml");
    let expr = rule["expr"].as_str().unwrap();
    assert!(expr.trim_end().ends_with("> 0.5"), "{expr}");
    format!("{} >= 0", expr.trim_end().trim_end_matches("> 0.5"))
}

/// The text page of an agent with native histograms on has exactly the
/// lines of one with them off, and promtool passes it.
#[test]
fn the_text_format_is_unchanged_with_native_histograms_on() {
    let on = native_agent();
    let off = Agent::start();
    for agent in [&on, &off] {
        agent.connect().known_traffic(5, 3, 2, 0);
        wait_for_value(agent, "messages_received_total", &[], 10.0);
    }
    let (on_page, off_page) = (on.scrape(), off.scrape());
    // Values differ (durations, memory); series, HELP and TYPE lines do not.
    assert_eq!(page_shape(&on_page), page_shape(&off_page));
    assert_eq!(
        value(&on_page, "message_processing_duration_seconds_count", &[]),
        10.0
    );
    if let Some(promtool) = require_bin("promtool") {
        let out = promtool_check_metrics(&promtool, &on_page);
        assert!(out.status.success(), "promtool: {out:?}");
    }
}

/// What each `Accept` gets, as docs/metrics.md says: the protobuf format
/// only when it is named with its `proto` and `encoding` and not preferred
/// less than text; gzip for both.
#[test]
fn accept_chooses_the_format_and_gzip_applies_to_both() {
    let agent = native_agent();
    agent.connect().known_traffic(2, 1, 0, 0);
    let cases: BTreeMap<&str, &str> = BTreeMap::from([
        ("", "text"),
        ("Accept: text/plain;version=0.0.4\r\n", "text"),
        // Prometheus 2.42 with --enable-feature=native-histograms.
        (
            "Accept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
             encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.1\r\n",
            "protobuf",
        ),
        // Prometheus 2.42 without it.
        (
            "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n",
            "text",
        ),
        // Protobuf without its proto and encoding, or preferred less.
        ("Accept: application/vnd.google.protobuf\r\n", "text"),
        (
            "Accept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
             encoding=delimited;q=0.2,text/plain;q=0.9\r\n",
            "text",
        ),
        (
            "Accept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
             encoding=delimited;q=0\r\n",
            "text",
        ),
    ]);
    for (accept, want) in cases {
        for gzip in [false, true] {
            let headers = if gzip {
                format!("{accept}Accept-Encoding: gzip\r\n")
            } else {
                accept.to_string()
            };
            let (status, h, body) = get_with_headers(agent.metrics_addr, "/metrics", &headers);
            let header = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            assert_eq!(status, 200);
            let want_type = match want {
                "protobuf" => PROTOBUF,
                _ => "text/plain; version=0.0.4; charset=utf-8",
            };
            assert_eq!(header("content-type"), Some(want_type), "{accept:?}");
            assert_eq!(header("vary"), Some("Accept, Accept-Encoding"));
            assert_eq!(
                header("content-encoding"),
                gzip.then_some("gzip"),
                "{accept:?}"
            );
            let body = if gzip {
                use std::io::Read as _;
                let mut plain = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut plain)
                    .expect("valid gzip");
                plain
            } else {
                body
            };
            let text = String::from_utf8_lossy(&body);
            let is_text = text.contains("# TYPE messages_received_total counter\n");
            assert_eq!(is_text, want == "text", "{accept:?}");
        }
    }
}
