//! docs/metrics.md must agree with `agent::telemetry::METRICS`, the single
//! place every metric is defined: every defined metric documented once with
//! the same type, unit and labels, nothing documented that is not defined,
//! the histogram buckets as defined, and PromQL examples that parse and use
//! only defined metrics.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use agent::telemetry::defs::LATENCY_BUCKETS;
use agent::telemetry::METRICS;
use common::*;

const TABLE_HEADER: [&str; 5] = ["Metric", "Type", "Unit", "Labels", "Meaning"];
const BUCKETS_PREFIX: &str = "Buckets: ";

/// One row of the metrics table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    name: String,
    kind: String,
    unit: String,
    labels: Vec<String>,
    meaning: String,
}

/// Splits a Markdown table row into trimmed cells (no escaped pipes are used).
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_string()).collect())
}

fn unquote(cell: &str) -> String {
    cell.trim().trim_matches('`').trim().to_string()
}

/// The rows of the one table whose header is [`TABLE_HEADER`].
fn parse_table(doc: &str) -> Result<Vec<Row>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| cells(l).is_some_and(|c| c == TABLE_HEADER))
        .map(|(i, _)| i)
        .collect();
    let [start] = headers[..] else {
        return Err(format!(
            "expected exactly one table headed {TABLE_HEADER:?}, found {}",
            headers.len()
        ));
    };
    let sep = lines.get(start + 1).and_then(|l| cells(l));
    if !sep.is_some_and(|c| {
        c.len() == 5
            && c.iter()
                .all(|s| !s.is_empty() && s.chars().all(|ch| ch == '-' || ch == ':'))
    }) {
        return Err("the metrics table header is not followed by a separator row".into());
    }
    let mut rows = Vec::new();
    for line in lines[start + 2..]
        .iter()
        .take_while(|l| l.trim_start().starts_with('|'))
    {
        let c = cells(line).ok_or_else(|| format!("malformed row: {line}"))?;
        if c.len() != 5 {
            return Err(format!("row has {} cells, expected 5: {line}", c.len()));
        }
        if !(c[0].starts_with('`') && c[0].ends_with('`')) {
            return Err(format!("metric name must be in backticks: {line}"));
        }
        let labels = match unquote(&c[3]).as_str() {
            "-" | "" => Vec::new(),
            _ => c[3].split(',').map(unquote).collect(),
        };
        rows.push(Row {
            name: unquote(&c[0]),
            kind: unquote(&c[1]),
            unit: unquote(&c[2]),
            labels,
            meaning: c[4].clone(),
        });
    }
    if rows.is_empty() {
        return Err("the metrics table has no rows".into());
    }
    Ok(rows)
}

fn unit_text(unit: Option<metrics::Unit>) -> String {
    unit.map_or("-".to_string(), |u| u.as_str().to_string())
}

/// Every disagreement between the document and the definitions.
fn check(doc: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let rows = match parse_table(doc) {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let mut documented: BTreeMap<&str, &Row> = BTreeMap::new();
    for row in &rows {
        if documented.insert(row.name.as_str(), row).is_some() {
            problems.push(format!("{} is documented twice", row.name));
        }
        if row.meaning.is_empty() {
            problems.push(format!("{} has no meaning", row.name));
        }
    }
    for def in METRICS {
        let Some(row) = documented.remove(def.name) else {
            problems.push(format!("{} is defined but not documented", def.name));
            continue;
        };
        if row.kind != def.kind.as_str() {
            problems.push(format!(
                "{}: documented type {:?}, defined {:?}",
                def.name,
                row.kind,
                def.kind.as_str()
            ));
        }
        let unit = unit_text(def.unit);
        if row.unit != unit {
            problems.push(format!(
                "{}: documented unit {:?}, defined {unit:?}",
                def.name, row.unit
            ));
        }
        let labels: Vec<String> = def.labels.iter().map(|l| l.to_string()).collect();
        if row.labels != labels {
            problems.push(format!(
                "{}: documented labels {:?}, defined {labels:?}",
                def.name, row.labels
            ));
        }
    }
    for name in documented.keys() {
        problems.push(format!("{name} is documented but not defined"));
    }
    problems.extend(check_buckets(doc));
    problems
}

/// The one `Buckets: ` line lists every defined histogram's buckets.
fn check_buckets(doc: &str) -> Vec<String> {
    let lines: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with(BUCKETS_PREFIX))
        .collect();
    let [line] = lines[..] else {
        return vec![format!(
            "expected one line starting with {BUCKETS_PREFIX:?}, found {}",
            lines.len()
        )];
    };
    let parsed: Result<Vec<f64>, _> = unquote(&line[BUCKETS_PREFIX.len()..])
        .split(',')
        .map(|b| b.trim().parse::<f64>())
        .collect();
    let Ok(parsed) = parsed else {
        return vec![format!("unparsable bucket list: {line}")];
    };
    let mut problems = Vec::new();
    for (def, b) in explicit_histograms() {
        if b != parsed.as_slice() {
            problems.push(format!(
                "{}: documented buckets {parsed:?}, defined {b:?}",
                def.name
            ));
        }
    }
    problems
}

/// The expressions of every ```promql block.
fn promql_examples(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```promql") => current = Some(String::new()),
            (Some(expr), "```") => {
                out.push(expr.trim().to_string());
                current = None;
            }
            (Some(expr), _) => {
                expr.push_str(line);
                expr.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn docs_match_metric_definitions() {
    let problems = check(&read_doc("metrics.md"));
    assert!(
        problems.is_empty(),
        "docs/metrics.md disagrees with METRICS:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(
        parse_table(&read_doc("metrics.md")).unwrap().len(),
        METRICS.len()
    );
}

#[test]
fn every_histogram_has_explicit_buckets() {
    for (def, buckets) in explicit_histograms() {
        assert_eq!(buckets, LATENCY_BUCKETS, "{}", def.name);
    }
}

/// The checker itself: each kind of disagreement is caught.
#[test]
fn checker_catches_every_kind_of_disagreement() {
    let doc = read_doc("metrics.md");
    let row = |name: &str| {
        doc.lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("no row for {name}"))
            .to_string()
    };
    let storage = row("storage_operations_total");
    let build = row("agent_build_info");
    let cpu = row("process_cpu_usage");
    let cases: Vec<(String, &str)> = vec![
        (
            doc.replace(&storage, ""),
            "storage_operations_total is defined but not documented",
        ),
        (
            doc.replace(&storage, &storage.replace("| counter |", "| gauge |")),
            "storage_operations_total: documented type \"gauge\", defined \"counter\"",
        ),
        (
            doc.replace(
                &storage,
                &storage.replace("`operation`, `backend`", "`backend`, `operation`"),
            ),
            "storage_operations_total: documented labels",
        ),
        (
            doc.replace(
                &storage,
                &storage.replace("`operation`, `backend`", "`operation`"),
            ),
            "storage_operations_total: documented labels [\"operation\"]",
        ),
        (
            doc.replace(&build, &build.replace("| `version` |", "| - |")),
            "agent_build_info: documented labels []",
        ),
        (
            doc.replace(&cpu, &cpu.replace("| percent |", "| seconds |")),
            "process_cpu_usage: documented unit \"seconds\", defined \"percent\"",
        ),
        (
            doc.replace(
                &build,
                &format!("{build}\n| `agent_bogus_total` | counter | count | - | Not real. |"),
            ),
            "agent_bogus_total is documented but not defined",
        ),
        (
            doc.replace(&build, &format!("{build}\n{build}")),
            "agent_build_info is documented twice",
        ),
        (
            doc.replace("0.0025, ", ""),
            "message_processing_duration_seconds: documented buckets",
        ),
        (
            doc.replace("| Metric | Type |", "| Name | Type |"),
            "expected exactly one table",
        ),
    ];
    for (mutated, expected) in cases {
        assert_ne!(mutated, doc, "mutation for {expected:?} changed nothing");
        let problems = check(&mutated);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?}, got {problems:?}"
        );
    }
}

#[test]
fn promql_examples_use_only_defined_metrics() {
    let examples = promql_examples(&read_doc("metrics.md"));
    assert!(
        examples.len() >= 10,
        "expected the PromQL examples, found {}",
        examples.len()
    );
    for expr in &examples {
        assert!(!expr.is_empty(), "empty promql block");
        assert_eq!(unknown_metrics(expr), Vec::<String>::new(), "in {expr}");
    }
    // Every histogram and the headline counters have at least one example.
    for name in [
        "message_processing_duration_seconds_bucket",
        "storage_operation_duration_seconds_bucket",
        "messages_received_total",
        "messages_failed_total",
        "storage_operation_errors_total",
        "agent_peers_connected",
        "process_cpu_usage",
        "process_memory_bytes",
        "agent_connections_rejected_total",
    ] {
        assert!(
            examples.iter().any(|e| e.contains(name)),
            "no PromQL example uses {name}"
        );
    }
    assert_eq!(
        unknown_metrics("rate(messages_recieved_total[5m])"),
        vec!["messages_recieved_total"]
    );
    assert_eq!(
        unknown_metrics("histogram_quantile(0.9, x_bucket{le=\"a_b\"})"),
        vec!["x_bucket"]
    );
}

/// `promtool check rules` parses every example as a recording rule.
#[test]
fn promql_examples_parse() {
    let Some(promtool) = require_bin("promtool") else {
        return;
    };
    let examples = promql_examples(&read_doc("metrics.md"));
    let mut rules = String::from("groups:\n  - name: docs_metrics_md\n    rules:\n");
    for (i, expr) in examples.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: docs:example_{i}\n        expr: |\n"
        ));
        for line in expr.lines() {
            rules.push_str(&format!("          {line}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("examples.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new(promtool)
        .arg("check")
        .arg("rules")
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool rejected an example:\n{}\n{}\nrules:\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{} rules found", examples.len())),
        "{stdout}"
    );
}
