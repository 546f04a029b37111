//! The operator kit in `docs/`: the Prometheus config, the alert rules and
//! their unit tests, and the Grafana dashboard. Checked with the real
//! `promtool` and a real `prometheus` server, and against the metric
//! definitions in `agent::telemetry::METRICS`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

/// Every alerting rule in docs/alerts.yml: (alert name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let doc = yaml(&read_doc("alerts.yml"));
    let mut rules = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            let expr = rule["expr"].as_str().expect("expr");
            rules.push((name.to_string(), expr.trim().to_string()));
        }
    }
    rules
}

/// Copies the docs config into `dir` with the agent job's file_sd glob
/// moved into `dir/targets`, next to copies of alerts.yml and the example
/// targets file (the install layout, in a temporary directory). Returns
/// the config's path.
fn installed_layout(dir: &Path) -> PathBuf {
    let targets = dir.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    std::fs::copy(
        docs_dir().join("targets/agents.yml"),
        targets.join("agents.yml"),
    )
    .unwrap();
    std::fs::copy(docs_dir().join("alerts.yml"), dir.join("alerts.yml")).unwrap();
    let mut config = yaml(&read_doc("prometheus.yml"));
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs");
    let agent = jobs
        .iter_mut()
        .find(|j| j["job_name"] == "agent")
        .expect("job agent");
    let files = &mut agent["file_sd_configs"][0]["files"];
    assert_eq!(
        files.as_sequence().map(Vec::len),
        Some(1),
        "one targets glob expected: {files:?}"
    );
    files[0] = format!("{}/agents*.yml", targets.display()).into();
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
    file
}

// ---------------------------------------------------------------- promtool

#[test]
fn promtool_check_config_accepts_docs_prometheus_yml() {
    let Some(bin) = require_bin("promtool") else {
        return;
    };
    // As documented: from the repository, the only complaint is the missing
    // targets files of an uninstalled Prometheus.
    let (ok, out) = run_promtool(&bin, &docs_dir(), &["check", "config", "prometheus.yml"]);
    assert!(ok, "promtool check config failed:\n{out}");
    assert!(
        out.contains("SUCCESS: prometheus.yml is valid prometheus config file syntax"),
        "{out}"
    );
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");

    // The scrape job the alerts and the dashboard rely on, discovered by file_sd.
    let config = yaml(&read_doc("prometheus.yml"));
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let agent = jobs
        .iter()
        .find(|j| j["job_name"] == "agent")
        .expect("a scrape job named agent");
    assert_eq!(agent["metrics_path"], "/metrics");
    let files = &agent["file_sd_configs"][0]["files"];
    assert!(
        files.as_sequence().is_some_and(|f| !f.is_empty()),
        "file_sd files: {files:?}"
    );
    assert_eq!(config["rule_files"][0], "alerts.yml");

    // Installed layout: promtool also parses the file_sd targets files, so
    // the example docs/targets/agents.yml is checked too, with no warning.
    let dir = tempfile::tempdir().unwrap();
    let file = installed_layout(dir.path());
    let file = file.to_str().unwrap();
    let (ok, out) = run_promtool(&bin, dir.path(), &["check", "config", file]);
    assert!(
        ok,
        "promtool check config (installed layout) failed:\n{out}"
    );
    assert!(
        out.contains("is valid prometheus config file syntax"),
        "{out}"
    );
    assert!(out.contains("SUCCESS: 14 rules found"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");

    // Control: a malformed targets file next to it makes the check fail, so
    // the success above really covered the targets file.
    std::fs::write(
        dir.path().join("targets/agents-bad.yml"),
        "- targets: node1:8080\n",
    )
    .unwrap();
    let (ok, out) = run_promtool(&bin, dir.path(), &["check", "config", file]);
    assert!(!ok, "a malformed targets file must fail the check:\n{out}");
    assert!(out.contains("checking SD file"), "{out}");
}

#[test]
fn promtool_check_rules_accepts_docs_alerts_yml() {
    let Some(bin) = require_bin("promtool") else {
        return;
    };
    let (ok, out) = run_promtool(&bin, &docs_dir(), &["check", "rules", "alerts.yml"]);
    assert!(ok, "promtool check rules failed:\n{out}");
    let rules = alert_rules();
    assert_eq!(rules.len(), 14, "{rules:?}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{out}"
    );
    // Every alert carries a severity to route on, and a runbook_url that
    // points at its own section of docs/monitoring.md.
    let doc = yaml(&read_doc("alerts.yml"));
    let monitoring = read_doc("monitoring.md");
    for rule in doc["groups"][0]["rules"].as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{rule:?}"
        );
        assert!(rule["annotations"]["summary"].is_string(), "{rule:?}");
        assert!(rule["annotations"]["description"].is_string(), "{rule:?}");
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        assert_eq!(url, format!("docs/monitoring.md#{}", name.to_lowercase()));
        assert!(
            monitoring.contains(&format!("\n### {name}\n")),
            "docs/monitoring.md has no '### {name}' section for its runbook_url"
        );
        // Routing: aggregations keep the target's labels (env, role, ...).
        let expr = rule["expr"].as_str().unwrap();
        assert!(
            !expr.contains(" by ("),
            "{name} drops target labels: {expr}"
        );
    }
}

#[test]
fn promtool_test_rules_passes_docs_alerts_test_yml() {
    let Some(bin) = require_bin("promtool") else {
        return;
    };
    // Run from docs/, as documented: rule_files are relative to it.
    let (ok, out) = run_promtool(&bin, &docs_dir(), &["test", "rules", "alerts_test.yml"]);
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has a test case in which it fires.
    let tests = yaml(&read_doc("alerts_test.yml"));
    let mut fires = BTreeSet::new();
    for case in tests["tests"].as_sequence().expect("tests") {
        for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            if check["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty())
            {
                fires.insert(check["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    let alerts: BTreeSet<String> = alert_rules().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        fires, alerts,
        "every alert needs a test case where it fires"
    );
}

// ------------------------------------------------ PromQL: only known metrics

/// Every object in the JSON tree whose key is `key`, as strings.
fn collect_strings(value: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    _ => collect_strings(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, key, out)),
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read_doc("grafana/agent.json")).expect("dashboard is JSON")
}

/// The PromQL of every panel target (rows and nested panels included).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    collect_strings(&dashboard["panels"], "expr", &mut exprs);
    exprs
}

/// The series selector of each `label_values(selector, label)` variable query.
fn variable_selectors(dashboard: &serde_json::Value) -> Vec<String> {
    let mut selectors = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        let query = match &var["query"] {
            serde_json::Value::String(q) => q.clone(),
            q => q["query"].as_str().unwrap_or_default().to_string(),
        };
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            let (selector, _label) = args.rsplit_once(',').unwrap_or_else(|| {
                panic!("{query}: label_values without a metric would scan every series")
            });
            selectors.push(selector.trim().to_string());
        }
    }
    selectors
}

/// Replaces Grafana variables (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`) with `values`, and the built-in interval variables with a
/// duration. An undefined variable is an error.
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let builtin = |name: &str| -> Option<&'static str> {
        match name {
            "__rate_interval" | "__interval" | "__range" | "__auto_interval" => Some("5m"),
            "__interval_ms" | "__range_ms" => Some("300000"),
            "__range_s" => Some("300"),
            _ => None,
        }
    };
    let lookup = |name: &str| -> Result<String, String> {
        let name = name.split(':').next().unwrap_or(name);
        builtin(name)
            .map(str::to_string)
            .or_else(|| values.get(name).cloned())
            .ok_or_else(|| format!("undefined variable ${name} in {expr:?}"))
    };
    let mut out = String::new();
    let mut rest = expr;
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr:?}"))?;
            out.push_str(&lookup(&inner[..end])?);
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            let end = inner
                .find("]]")
                .ok_or_else(|| format!("unclosed [[ in {expr:?}"))?;
            out.push_str(&lookup(&inner[..end])?);
            rest = &inner[end + 2..];
        } else if let Some(inner) = tail.strip_prefix('$') {
            let end = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            if end == 0 {
                return Err(format!("stray $ in {expr:?}"));
            }
            out.push_str(&lookup(&inner[..end])?);
            rest = &inner[end..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The dashboard's own variables, each with the value a user may select:
/// the "All" value (`allValue`), then two instances as Grafana formats a
/// multi-value selection for Prometheus.
fn variable_values(dashboard: &serde_json::Value) -> Vec<BTreeMap<String, String>> {
    let mut all = BTreeMap::new();
    let mut two = BTreeMap::new();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let (all_value, two_values) = match var["type"].as_str() {
            Some("datasource") => ("prometheus", "prometheus"),
            Some("query") => (
                var["allValue"].as_str().unwrap_or(".*"),
                r"(node1:8080|node2\\.example:8080)",
            ),
            other => panic!("variable {name}: unexpected type {other:?}"),
        };
        all.insert(name.clone(), all_value.to_string());
        two.insert(name, two_values.to_string());
    }
    vec![all, two]
}

#[test]
fn metric_name_extraction_finds_exactly_the_selected_metrics() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(message_processing_duration_seconds_bucket{instance=~"a_b", le!="x_total"}[$__rate_interval]))) > 0.5"#,
            &["message_processing_duration_seconds_bucket"],
        ),
        (r#"absent(up{job="agent"})"#, &["up"]),
        (
            r#"count by (version) (agent_build_info{instance=~"$instance"})"#,
            &["agent_build_info"],
        ),
        (r#"sum(rate(x_total[5m])) by (le)"#, &["x_total"]),
        (
            "a / on(instance) group_left(version) b offset 5m and bool c or d unless e",
            &["a", "b", "c", "d", "e"],
        ),
        ("sum without (le) (f) / ignoring (reason) g", &["f", "g"]),
        (
            "process_memory_bytes > 1073741824 + 1e3 - Inf * NaN + 0x1f + .5",
            &["process_memory_bytes"],
        ),
        ("topk(3, h) @ start()", &["h"]),
        (r#"{job="agent"}"#, &[]),
        (
            "# messages_fake_total in a comment\nrate(i[1m:10s])",
            &["i"],
        ),
        (
            r#"label_replace(j, "dst_x", "$1", "src_y", "(.*)")"#,
            &["j"],
        ),
        ("count(k)", &["k"]),
    ];
    for (expr, want) in cases {
        assert_eq!(metric_names(expr).unwrap(), want.to_vec(), "in {expr}");
    }
    assert!(metric_names(r#"{__name__=~"agent_.*"}"#).is_err());
    assert!(metric_names(r#"up{job="agent}"#).is_err());

    assert!(is_known_metric("messages_received_total"));
    assert!(is_known_metric("storage_operation_duration_seconds_count"));
    assert!(is_known_metric("up"));
    assert!(!is_known_metric("messages_recieved_total"), "typo");
    // A native histogram is stored under the histogram's own name.
    assert!(is_known_metric("message_processing_duration_seconds"));
    assert!(
        !is_known_metric("message_processing_duration_seconds_total"),
        "counter suffix on a histogram"
    );
    assert!(
        !is_known_metric("process_memory_bytes_bucket"),
        "suffix on a gauge"
    );
    assert_eq!(
        unknown_metrics("rate(messages_recieved_total[5m]) / rate(messages_received_total[5m])"),
        vec!["messages_recieved_total"]
    );
}

#[test]
fn dashboard_and_alerts_use_only_defined_metrics() {
    let dashboard = dashboard();
    let exprs = dashboard_exprs(&dashboard);
    let panels_with_targets = {
        let mut targets = Vec::new();
        collect_strings(&dashboard["panels"], "refId", &mut targets);
        targets.len()
    };
    assert!(
        exprs.len() >= 15,
        "found only {} dashboard expressions",
        exprs.len()
    );
    assert_eq!(exprs.len(), panels_with_targets, "a target without an expr");
    let selectors = variable_selectors(&dashboard);
    assert_eq!(selectors, vec!["agent_build_info"]);
    let alerts = alert_rules();

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let all = exprs
        .iter()
        .map(|e| ("dashboard", e.as_str()))
        .chain(selectors.iter().map(|e| ("dashboard variable", e.as_str())))
        .chain(alerts.iter().map(|(_, e)| ("alerts.yml", e.as_str())));
    for (source, expr) in all {
        match metric_names(expr) {
            Ok(names) if names.is_empty() => {
                problems.push(format!("{source}: selects no metric: {expr}"))
            }
            Ok(names) => {
                for name in names {
                    if !is_known_metric(&name) {
                        problems.push(format!("{source}: unknown metric {name} in {expr}"));
                    }
                    used.insert(name);
                }
            }
            Err(e) => problems.push(format!("{source}: {e}")),
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));

    // The headline metrics are all on the dashboard or in an alert.
    for name in [
        "up",
        "process_cpu_usage",
        "process_memory_bytes",
        "agent_peers_connected",
        "messages_received_total",
        "messages_failed_total",
        "message_processing_duration_seconds_bucket",
        "storage_operations_total",
        "storage_operation_errors_total",
        "storage_operation_duration_seconds_bucket",
        "agent_build_info",
    ] {
        assert!(
            used.contains(name),
            "{name} is neither on the dashboard nor in an alert"
        );
    }
}

#[test]
fn grafana_variables_substitute_and_undefined_ones_are_errors() {
    let vars = BTreeMap::from([("instance".to_string(), ".+".to_string())]);
    assert_eq!(
        substitute(r#"rate(x{instance=~"$instance"}[$__rate_interval])"#, &vars).unwrap(),
        r#"rate(x{instance=~".+"}[5m])"#
    );
    assert_eq!(
        substitute(
            r#"x{instance=~"${instance:regex}", a="[[instance]]"}[${__interval}]"#,
            &vars
        )
        .unwrap(),
        r#"x{instance=~".+", a=".+"}[5m]"#
    );
    assert!(substitute("x{a=\"$nope\"}", &vars)
        .unwrap_err()
        .contains("$nope"));
    assert!(
        substitute("x[$__rate_interval", &vars).is_ok(),
        "Prometheus, not this, rejects that"
    );
}

// ---------------------------------- Prometheus accepts every expression

#[test]
fn prometheus_accepts_every_dashboard_and_alert_expression() {
    let dashboard = dashboard();
    let mut exprs = Vec::new();
    for values in variable_values(&dashboard) {
        for expr in dashboard_exprs(&dashboard) {
            let substituted = substitute(&expr, &values).unwrap_or_else(|e| panic!("{e}"));
            assert!(!substituted.contains('$'), "{substituted}");
            exprs.push(substituted);
        }
    }
    exprs.extend(variable_selectors(&dashboard));
    exprs.extend(alert_rules().into_iter().map(|(_, e)| e));

    // Prometheus also loads alerts.yml itself, as an installed one does.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(docs_dir().join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
    let config =
        "global:\n  evaluation_interval: 1m\nrule_files:\n  - alerts.yml\nscrape_configs: []\n";
    let Some(prom) = Prometheus::start_in(dir, config) else {
        return;
    };

    let rejected: Vec<String> = exprs
        .iter()
        .filter_map(|e| {
            prom.try_query(e)
                .err()
                .map(|answer| format!("{e}\n    -> {answer}"))
        })
        .collect();
    assert!(
        rejected.is_empty(),
        "Prometheus rejected:\n  {}",
        rejected.join("\n  ")
    );

    // Controls: the same API does reject broken PromQL.
    for bad in [
        "rate(messages_received_total[$__rate_interval])",
        "rate(messages_received_total)",
        "sum by (le) (rate(message_processing_duration_seconds_bucket[5m])",
    ] {
        let answer = prom.try_query(bad).expect_err(bad);
        assert_eq!(answer["errorType"], "bad_data", "{bad}: {answer}");
    }

    // Every alert of alerts.yml was loaded.
    let rules = prom.api("/api/v1/rules?type=alert");
    assert_eq!(rules["status"], "success", "{rules}");
    let loaded: BTreeSet<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = alert_rules().into_iter().map(|(name, _)| name).collect();
    assert_eq!(loaded, want);
}
