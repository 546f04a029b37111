//! PromQL as the tests read it: the metric names an expression selects,
//! checked against the metric catalog (`agent::telemetry::METRICS`), and
//! the catalog's histograms with their explicit buckets.

use agent::telemetry::defs::{Kind, MetricDef};
use agent::telemetry::METRICS;

/// Every histogram in the catalog with its buckets, asserting that there
/// are exactly the two latency histograms and that each has explicit
/// buckets (the exporter's defaults would be meaningless for them).
pub fn explicit_histograms() -> Vec<(&'static MetricDef, &'static [f64])> {
    let histograms: Vec<_> = METRICS
        .iter()
        .filter(|d| d.kind == Kind::Histogram)
        .map(|def| {
            let buckets = def
                .buckets
                .unwrap_or_else(|| panic!("{} has no explicit buckets", def.name));
            (def, buckets)
        })
        .collect();
    assert_eq!(histograms.len(), 2);
    histograms
}

/// PromQL aggregation operators: `sum by (x) (...)` is not a metric `sum`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Other words that are never metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "start", "end",
];

/// The metric names an expression selects: identifiers that are not
/// functions, aggregations, keywords, label names (inside `{...}`, `by (...)`
/// and friends), strings, numbers or durations.
pub fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let n = chars.len();
    let is_ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Index of the next non-whitespace character at or after `i`.
    let skip_ws = |mut i: usize| {
        while i < n && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    // Index just past the string starting at `i`.
    let skip_string = |i: usize| -> Result<usize, String> {
        let quote = chars[i];
        let mut j = i + 1;
        while j < n {
            match chars[j] {
                '\\' if quote != '`' => j += 2,
                c if c == quote => return Ok(j + 1),
                _ => j += 1,
            }
        }
        Err(format!("unterminated string in {expr:?}"))
    };
    // Index just past the bracket that closes the one at `i`, skipping strings.
    let skip_group = |i: usize, close: char| -> Result<(usize, String), String> {
        let mut j = i + 1;
        let mut inner = String::new();
        while j < n {
            match chars[j] {
                '"' | '\'' | '`' => {
                    let end = skip_string(j)?;
                    inner.extend(&chars[j..end]);
                    j = end;
                }
                c if c == close => return Ok((j + 1, inner)),
                c => {
                    inner.push(c);
                    j += 1;
                }
            }
        }
        Err(format!("unclosed {:?} in {expr:?}", chars[i]))
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < n {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < n && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i)?;
        } else if c == '{' {
            let (end, matchers) = skip_group(i, '}')?;
            if matchers.contains("__name__") {
                return Err(format!(
                    "selects by __name__, which this check cannot follow: {expr:?}"
                ));
            }
            i = end;
        } else if c == '[' {
            i = skip_group(i, ']')?.0;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // Numbers, hex, exponents and durations: 0.99, 1e3, 0x1f, 5m30s.
            while i < n && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < n && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            let next_char = chars.get(next).copied();
            let next_word: String = chars[next..].iter().take_while(|c| is_ident(**c)).collect();
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                if next_char == Some('(') {
                    i = skip_group(next, ')')?.0;
                }
            } else if KEYWORDS.contains(&word.as_str())
                || word.eq_ignore_ascii_case("inf")
                || word.eq_ignore_ascii_case("nan")
                || next_char == Some('(')
                || (AGGREGATIONS.contains(&word.as_str())
                    && ["by", "without"].contains(&next_word.as_str()))
            {
                // A keyword, a literal, or a function or aggregation call.
            } else {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// Whether the agent exports `name` (histograms as their `_bucket`, `_sum`
/// and `_count` series, or under their own name as native histograms), or
/// it is Prometheus' own `up`.
pub fn is_known_metric(name: &str) -> bool {
    name == "up"
        || METRICS.iter().any(|d| match d.kind {
            Kind::Histogram => ["_bucket", "_sum", "_count", ""]
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(d.name)),
            Kind::Counter | Kind::Gauge => name == d.name,
        })
}

/// The names `expr` selects that the agent does not export, or the reason
/// the names could not be read.
pub fn unknown_metrics(expr: &str) -> Vec<String> {
    match metric_names(expr) {
        Ok(names) => names.into_iter().filter(|n| !is_known_metric(n)).collect(),
        Err(e) => vec![e],
    }
}

/// The PromQL of every panel of the Grafana dashboard.
pub fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(super::docs_dir().join("grafana/agent.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    exprs
}

/// Whether `expr` selects a histogram under its own name: the series a
/// Prometheus that ingests native histograms stores.
pub fn selects_native_histograms(expr: &str) -> bool {
    metric_names(expr).is_ok_and(|names| {
        names.iter().any(|name| {
            METRICS
                .iter()
                .any(|d| d.kind == Kind::Histogram && d.name == name)
        })
    })
}
