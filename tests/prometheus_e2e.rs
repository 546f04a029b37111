//! End to end with a real Prometheus: the config operators install
//! (docs/prometheus.yml, file_sd targets, docs/alerts.yml) scrapes the real
//! agent every second, and Prometheus' HTTP API reports exactly the traffic
//! the test sent.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// Traffic, in two phases so that rate() has an increase between scrapes.
const PUTS: usize = 40;
const GETS: usize = 25;
const DELETES: usize = 15;
const UNKNOWN_OPS: usize = 1;

/// docs/prometheus.yml as installed, with only the intervals shortened to
/// 1 s and the file_sd glob moved into `dir`, where the targets file lists
/// the agent (with an extra label, as operators do).
fn config_for(dir: &Path, agent: &Agent) -> String {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::copy(docs.join("alerts.yml"), dir.join("alerts.yml")).unwrap();
    let targets = dir.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    std::fs::write(
        targets.join("agents-e2e.yml"),
        format!(
            "- targets:\n    - {}\n  labels:\n    env: e2e\n",
            agent.metrics_addr
        ),
    )
    .unwrap();

    let text = std::fs::read_to_string(docs.join("prometheus.yml")).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        config["global"][key] = "1s".into();
    }
    let jobs = config["scrape_configs"].as_sequence_mut().unwrap();
    assert_eq!(jobs.len(), 1, "one scrape job expected");
    let job = &mut jobs[0];
    assert_eq!(job["job_name"], "agent");
    job["scrape_interval"] = "1s".into();
    if job.get("scrape_timeout").is_some() {
        job["scrape_timeout"] = "1s".into();
    }
    job["file_sd_configs"][0]["files"] = vec![format!("{}/agents*.yml", targets.display())].into();
    serde_yaml::to_string(&config).unwrap()
}

/// Waits until Prometheus holds, for every series of `selector`, a sample
/// scraped after `after` (Unix seconds), and returns each series' latest raw
/// sample value. Raw samples carry their scrape timestamps, so this knows
/// the value includes everything the agent counted before `after`.
fn scraped_after(prom: &Prometheus, selector: &str, after: f64) -> BTreeMap<String, f64> {
    prom.latest_after(selector, after)
        .into_iter()
        .map(|(labels, value)| {
            let key = labels
                .into_iter()
                .filter(|(k, _)| !["job", "instance", "env"].contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            (key, value)
        })
        .collect()
}

/// An instant query's single sample value.
fn single_value(prom: &Prometheus, expr: &str) -> f64 {
    let result = prom.query(expr);
    assert_eq!(result.len(), 1, "{expr}: {result:?}");
    sample_number(&result[0]["value"][1])
}

#[test]
fn prometheus_scrapes_the_agent_and_reports_exact_counts() {
    if require_bin("prometheus").is_none() {
        return;
    }
    // One configured peer that never answers: AgentNoPeers must go pending
    // (it fires only where peers are expected).
    let agent = Agent::start_with(AgentOptions::default().env(
        "AGENT_NETWORK__PEERS",
        format!("[127.0.0.1:{}]", free_port()),
    ));
    // Prometheus 3 refuses a scrape without a valid Content-Type.
    let resp = agent.http_get("/metrics");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );

    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), &agent);
    let prom = Prometheus::start_in(dir, &config).expect("prometheus is installed");
    let instance = agent.metrics_addr.to_string();

    // First scrape: up{job="agent"} is 1, with the file_sd label attached.
    let mut up = Vec::new();
    let scraped = wait_until(|| {
        up = prom.query(r#"up{job="agent"}"#);
        !up.is_empty()
    });
    assert!(
        scraped,
        "Prometheus never scraped the agent:\n{}",
        prom.log()
    );
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(
        series_labels(&up[0]),
        BTreeMap::from([
            ("env".to_string(), "e2e".to_string()),
            ("instance".to_string(), instance.clone()),
            ("job".to_string(), "agent".to_string()),
        ])
    );
    assert_eq!(
        sample_number(&up[0]["value"][1]),
        1.0,
        "{up:?}\n{}",
        prom.log()
    );
    let targets = prom.api("/api/v1/targets?state=active");
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(active[0]["lastError"], "", "{targets}");
    assert_eq!(active[0]["scrapeUrl"], format!("http://{instance}/metrics"));

    // Phase 1: puts only.
    let mut peer = agent.connect();
    peer.known_traffic(PUTS, 0, 0, 0);
    let phase1 = scraped_after(&prom, r#"messages_received_total{job="agent"}"#, now_secs());
    assert_eq!(phase1, BTreeMap::from([(String::new(), PUTS as f64)]));

    // Phase 2: gets and deletes of stored keys, and an unknown op.
    peer.known_traffic(0, GETS, DELETES, UNKNOWN_OPS);
    drop(peer);
    let end = now_secs();
    let total = PUTS + GETS + DELETES + UNKNOWN_OPS;

    let received = scraped_after(&prom, r#"messages_received_total{job="agent"}"#, end);
    assert_eq!(received, BTreeMap::from([(String::new(), total as f64)]));
    let storage = scraped_after(&prom, r#"storage_operations_total{job="agent"}"#, end);
    assert_eq!(
        storage,
        BTreeMap::from([
            ("backend=local,operation=delete".to_string(), DELETES as f64),
            ("backend=local,operation=get".to_string(), GETS as f64),
            ("backend=local,operation=put".to_string(), PUTS as f64),
        ])
    );

    // The same through ordinary PromQL, as operators query it.
    assert_eq!(
        single_value(&prom, r#"messages_received_total{job="agent"}"#),
        total as f64
    );
    assert_eq!(
        single_value(
            &prom,
            r#"sum(messages_failed_total{job="agent", reason="unknown_op"})"#
        ),
        UNKNOWN_OPS as f64
    );
    assert_eq!(
        single_value(&prom, r#"sum(messages_failed_total{job="agent"})"#),
        UNKNOWN_OPS as f64
    );
    let by_op =
        prom.query(r#"sum by (operation, backend) (storage_operations_total{job="agent"})"#);
    let by_op: BTreeMap<(String, String), f64> = by_op
        .iter()
        .map(|s| {
            let l = series_labels(s);
            (
                (l["operation"].clone(), l["backend"].clone()),
                sample_number(&s["value"][1]),
            )
        })
        .collect();
    let local = |op: &str| (op.to_string(), "local".to_string());
    assert_eq!(
        by_op,
        BTreeMap::from([
            (local("delete"), DELETES as f64),
            (local("get"), GETS as f64),
            (local("put"), PUTS as f64)
        ])
    );
    assert_eq!(
        single_value(&prom, r#"sum(storage_operation_errors_total{job="agent"})"#),
        0.0
    );
    assert_eq!(
        single_value(
            &prom,
            r#"message_processing_duration_seconds_count{job="agent"}"#
        ),
        total as f64
    );
    assert_eq!(
        single_value(
            &prom,
            r#"storage_operation_duration_seconds_count{job="agent", operation="get"}"#
        ),
        GETS as f64
    );

    // The p99 from the buckets: the traffic between two scrapes gives rate()
    // an increase, so the quantile is a real latency, within the buckets.
    let p99 = single_value(
        &prom,
        "histogram_quantile(0.99, sum by (le) (rate(message_processing_duration_seconds_bucket[1m])))",
    );
    assert!(p99.is_finite() && p99 > 0.0 && p99 <= 10.0, "p99 = {p99}");

    // The installed alerts evaluate against the real series without errors:
    // the agent has a peer configured and none connected (AgentNoPeers
    // pending, for: 10m, with the targets file's env label), it is up and
    // scraped (AgentDown and AgentTargetsMissing inactive), its storage is
    // usable (AgentStorageDown inactive).
    let alerts_yml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/alerts.yml"))
            .unwrap();
    let defined = alerts_yml.matches("- alert: ").count();
    let mut rules = Vec::new();
    let settled = wait_until(|| {
        let answer = prom.api("/api/v1/rules?type=alert");
        rules = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let state = |name: &str| {
            rules
                .iter()
                .find(|r| r["name"] == name)
                .map(|r| r["state"].as_str().unwrap_or("").to_string())
        };
        rules.len() == defined
            && rules.iter().all(|r| r["health"] == "ok")
            && state("AgentNoPeers").as_deref() == Some("pending")
    });
    assert!(
        settled,
        "alert rules did not evaluate as expected: {rules:#?}\n{}",
        prom.log()
    );
    for rule in &rules {
        assert_eq!(rule["lastError"].as_str().unwrap_or(""), "", "{rule}");
        if ["AgentDown", "AgentTargetsMissing", "AgentStorageDown"]
            .contains(&rule["name"].as_str().unwrap())
        {
            assert_eq!(rule["state"], "inactive", "{rule}");
        }
    }
    let pending = rules.iter().find(|r| r["name"] == "AgentNoPeers").unwrap();
    let alert = &pending["alerts"][0];
    assert_eq!(alert["labels"]["instance"], instance.as_str(), "{pending}");
    assert_eq!(alert["labels"]["severity"], "warning", "{pending}");
    assert_eq!(
        alert["labels"]["env"], "e2e",
        "routing labels kept: {pending}"
    );
}

#[test]
fn prometheus_scrapes_over_https_with_basic_auth() {
    if require_bin("prometheus").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(certs.path(), "scrape");
    let leaf = ca.leaf(certs.path(), "agent");
    let web = certs.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{}'\n",
            leaf.cert_file.display(),
            leaf.key_file.display(),
            pki::bcrypt_hash("scrape-secret")
        ),
    )
    .unwrap();
    let agent = Agent::start_with(
        AgentOptions::default().env("AGENT_METRICS__WEB_CONFIG_FILE", web.display()),
    );
    let password_file = dir.path().join("agent.pw");
    std::fs::write(&password_file, "scrape-secret").unwrap();

    // docs/prometheus.yml with the job switched to HTTPS and basic auth, as
    // docs/security.md tells operators to do.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&config_for(dir.path(), &agent)).unwrap();
    let job = &mut config["scrape_configs"][0];
    job["scheme"] = "https".into();
    job["basic_auth"] = serde_yaml::from_str(&format!(
        "{{username: prometheus, password_file: {}}}",
        password_file.display()
    ))
    .unwrap();
    job["tls_config"] =
        serde_yaml::from_str(&format!("{{ca_file: {}}}", ca.cert_file.display())).unwrap();
    let prom = Prometheus::start_in(dir, &serde_yaml::to_string(&config).unwrap())
        .expect("prometheus is installed");

    let mut peer = agent.connect();
    peer.known_traffic(3, 0, 0, 0);
    let received = scraped_after(&prom, r#"messages_received_total{job="agent"}"#, now_secs());
    assert_eq!(received, BTreeMap::from([(String::new(), 3.0)]));
    let targets = prom.api("/api/v1/targets?state=active");
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(active[0]["lastError"], "", "{targets}");
    assert_eq!(
        active[0]["scrapeUrl"],
        format!("https://{}/metrics", agent.metrics_addr)
    );
    // Prometheus authenticated every time: no 401 was ever answered.
    let text = pki::https_get(
        agent.metrics_addr,
        "/metrics",
        pki::client_config(&ca.cert_file, None),
        Some(("prometheus", "scrape-secret")),
    )
    .unwrap()
    .body;
    assert_eq!(
        sample(&text, "agent_http_requests_unauthorized_total", &[]),
        Some(0.0)
    );
}
