//! A fleet's metrics through federation, with real Prometheus servers: a
//! site server running docs/prometheus.yml scrapes the agent, and a global
//! server running docs/prometheus-federation.yml federates the site. The
//! agent's series, with their exact values, the dashboard's queries and the
//! alerts all work on the global server.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::Value;

const PUTS: usize = 30;
const GETS: usize = 20;
const DELETES: usize = 10;
const UNKNOWN_OPS: usize = 2;

/// Runs promtool in docs/, asserting success.
fn promtool(args: &[&str]) {
    let Some(bin) = require_bin("promtool") else {
        return;
    };
    let (ok, text) = run_promtool(&bin, &docs_dir(), args);
    assert!(ok, "promtool {args:?}:\n{text}");
}

/// `file` from docs/ as installed in `dir`, with every interval shortened
/// to 1 s and its one file_sd glob moved to `dir/targets/<glob>`, where a
/// targets file lists `target` with `labels`. Copies the rule files too.
fn installed(dir: &Path, file: &str, glob: &str, target: &str, labels: &str) -> String {
    let targets = dir.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    std::fs::write(
        targets.join(glob.replace('*', "-e2e")),
        format!("- targets:\n    - {target}\n  labels:\n{labels}"),
    )
    .unwrap();
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(docs_dir().join(file)).unwrap()).unwrap();
    for rule_file in config["rule_files"].as_sequence().unwrap() {
        let name = rule_file.as_str().unwrap();
        std::fs::copy(docs_dir().join(name), dir.join(name)).unwrap();
    }
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        config["global"][key] = "1s".into();
    }
    let jobs = config["scrape_configs"].as_sequence_mut().unwrap();
    assert_eq!(jobs.len(), 1, "{file}: one scrape job expected");
    let job = &mut jobs[0];
    job["scrape_interval"] = "1s".into();
    if job.get("scrape_timeout").is_some() {
        job["scrape_timeout"] = "1s".into();
    }
    job["file_sd_configs"][0]["files"] = vec![format!("{}/{glob}", targets.display())].into();
    serde_yaml::to_string(&config).unwrap()
}

/// Alerting rules as the server reports them.
fn alert_rules(prom: &Prometheus) -> Vec<Value> {
    prom.api("/api/v1/rules?type=alert")["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn rule_state(rules: &[Value], name: &str) -> String {
    rules
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["state"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn federation_files_pass_promtool() {
    promtool(&["check", "config", "prometheus-federation.yml"]);
    promtool(&["check", "rules", "federation-alerts.yml"]);
    promtool(&["test", "rules", "federation-alerts_test.yml"]);
}

/// The YAML block of docs/monitoring.md's remote-write paragraph, merged
/// into docs/prometheus.yml as the section tells site operators to do, is
/// a valid Prometheus config.
#[test]
fn remote_write_snippet_is_a_valid_site_config() {
    let Some(bin) = require_bin("promtool") else {
        return;
    };
    let doc = std::fs::read_to_string(docs_dir().join("monitoring.md")).unwrap();
    let snippet = doc
        .split_once("**Remote write: the site servers push to Thanos or Mimir.**")
        .and_then(|(_, rest)| rest.split_once("```yaml\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("remote-write yaml block in docs/monitoring.md");
    let snippet: serde_yaml::Value = serde_yaml::from_str(snippet).unwrap();
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(docs_dir().join("prometheus.yml")).unwrap())
            .unwrap();
    config["global"]["external_labels"] = snippet["global"]["external_labels"].clone();
    config["remote_write"] = snippet["remote_write"].clone();
    assert_eq!(config["global"]["external_labels"]["site"], "eu1");
    assert!(config["remote_write"][0]["url"].is_string(), "{snippet:?}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(docs_dir().join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        serde_yaml::to_string(&config).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(dir.path())
        .output()
        .expect("run promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("SUCCESS: prometheus.yml is valid prometheus config file syntax"),
        "{text}"
    );
}

#[test]
fn global_prometheus_federates_a_site_with_exact_values() {
    if require_bin("prometheus").is_none() {
        return;
    }
    // One configured peer that never answers: AgentNoPeers goes pending.
    let agent = Agent::start_with(AgentOptions::default().env(
        "AGENT_NETWORK__PEERS",
        format!("[127.0.0.1:{}]", free_port()),
    ));
    let instance = agent.metrics_addr.to_string();

    let site_dir = tempfile::tempdir().unwrap();
    let site_config = installed(
        site_dir.path(),
        "prometheus.yml",
        "agents*.yml",
        &instance,
        "    env: e2e\n",
    );
    let site = Prometheus::start_in(site_dir, &site_config).expect("prometheus is installed");
    let global_dir = tempfile::tempdir().unwrap();
    let global_config = installed(
        global_dir.path(),
        "prometheus-federation.yml",
        "sites*.yml",
        &site.addr.to_string(),
        "    site: e2e-site\n",
    );
    let global = Prometheus::start_in(global_dir, &global_config).expect("prometheus is installed");

    let mut peer = agent.connect();
    peer.known_traffic(PUTS, GETS, DELETES, UNKNOWN_OPS);
    drop(peer);
    let end = now_secs();
    let total = PUTS + GETS + DELETES + UNKNOWN_OPS;

    // The agent's series on the global server: the exact value, and the
    // labels the site gave it (job, instance, file_sd) plus the site's.
    let received = global.latest_after("messages_received_total", end);
    // (The name is the selector's; the labels are compared without it.)
    let want_labels = BTreeMap::from([
        ("env".to_string(), "e2e".to_string()),
        ("instance".to_string(), instance.clone()),
        ("job".to_string(), "agent".to_string()),
        ("site".to_string(), "e2e-site".to_string()),
    ]);
    assert_eq!(received, vec![(want_labels.clone(), total as f64)]);
    let storage: BTreeMap<String, f64> = global
        .latest_after("storage_operations_total", end)
        .into_iter()
        .map(|(l, v)| (format!("{}/{}", l["backend"], l["operation"]), v))
        .collect();
    assert_eq!(
        storage,
        BTreeMap::from([
            ("local/delete".to_string(), DELETES as f64),
            ("local/get".to_string(), GETS as f64),
            ("local/put".to_string(), PUTS as f64),
        ])
    );
    let failed = global.query(r#"sum(messages_failed_total{job="agent", reason="unknown_op"})"#);
    assert_eq!(sample_number(&failed[0]["value"][1]), UNKNOWN_OPS as f64);
    // The site's up{job="agent"} is federated too: AgentDown works here.
    let up = global.query(r#"up{job="agent"}"#);
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(series_labels(&up[0]), want_labels.clone());
    assert_eq!(sample_number(&up[0]["value"][1]), 1.0);

    // Every dashboard query answers for the agent on the global server
    // (the rates once two federated samples are in their window).
    // ($__rate_interval as Grafana picks it for a 1 s scrape interval.)
    let selected = instance.replace('.', r"\\.");
    // The native-histogram panels stay empty here, as on any Prometheus
    // storing classic buckets (tests/native_histograms.rs fills them).
    let exprs: Vec<String> = dashboard_exprs()
        .iter()
        .filter(|e| !selects_native_histograms(e))
        .map(|e| {
            e.replace("$instance", &selected)
                .replace("$__rate_interval", "1m")
        })
        .collect();
    let mut empty = Vec::new();
    let answered = wait_until(|| {
        empty = exprs
            .iter()
            .filter(|e| global.query(e).is_empty())
            .cloned()
            .collect();
        empty.is_empty()
    });
    assert!(
        answered,
        "no data on the global server for:\n  {}",
        empty.join("\n  ")
    );

    // The alerts evaluate on the federated series: AgentNoPeers pending for
    // the agent (a peer configured, none connected), the others inactive, no
    // errors; the
    // site's own ALERTS series are not federated over the global's.
    let mut rules = Vec::new();
    let settled = wait_until(|| {
        rules = alert_rules(&global);
        rules.len() == defined_alerts()
            && rules.iter().all(|r| r["health"] == "ok")
            && rule_state(&rules, "AgentNoPeers") == "pending"
    });
    assert!(settled, "{rules:#?}\n{}", global.log());
    for rule in &rules {
        assert_eq!(rule["lastError"].as_str().unwrap_or(""), "", "{rule}");
        if rule["name"] != "AgentNoPeers" {
            assert_eq!(rule["state"], "inactive", "{rule}");
        }
    }
    let pending = rules.iter().find(|r| r["name"] == "AgentNoPeers").unwrap();
    assert_eq!(pending["alerts"].as_array().unwrap().len(), 1, "{pending}");
    assert_eq!(
        pending["alerts"][0]["labels"]["instance"],
        instance.as_str()
    );
    assert_eq!(pending["alerts"][0]["labels"]["site"], "e2e-site");
    assert!(
        wait_until(|| !site.query("ALERTS").is_empty()),
        "the site evaluates alerts.yml too"
    );
    let alerts = global.query(r#"ALERTS{alertname="AgentNoPeers"}"#);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(
        !global.log().contains("Error on ingesting"),
        "{}",
        global.log()
    );

    // The site server goes away: its agents' series go stale on the global
    // server, and FederatedPrometheusDown says why.
    drop(site);
    let mut rules = Vec::new();
    let noticed = wait_until(|| {
        rules = alert_rules(&global);
        rule_state(&rules, "FederatedPrometheusDown") == "pending"
    });
    assert!(noticed, "{rules:#?}\n{}", global.log());
    let down = global.query(r#"up{job="federate"}"#);
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(sample_number(&down[0]["value"][1]), 0.0);
    assert_eq!(series_labels(&down[0])["site"], "e2e-site");
}

/// The alerts the global server loads: docs/alerts.yml and
/// docs/federation-alerts.yml.
fn defined_alerts() -> usize {
    ["alerts.yml", "federation-alerts.yml"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(f))
                .unwrap()
                .matches("- alert: ")
                .count()
        })
        .sum()
}
