//! The scrape: every series of the registry, in the text format (written
//! with `metrics_exporter_prometheus::formatting`, so names, escaping and
//! layout stay the library's) or as protobuf `MetricFamily` messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;

use metrics::Key;
use metrics_exporter_prometheus::formatting::{
    sanitize_metric_name, write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::LabelSet;

use super::{lock, ShardedRecorder};
use crate::telemetry::protobuf::{self, MetricType};

impl ShardedRecorder {
    /// Appends every series in the Prometheus text format 0.0.4: one family
    /// per name, sorted by name, its series sorted by labels.
    pub fn render_into(&self, out: &mut String) {
        let descriptions = lock(&self.registry.descriptions);
        let help = |name: &str| descriptions.get(name).map(|d| d.as_ref());

        let counters = families(&lock(&self.registry.counters), |c| c.value());
        for (name, series) in counters {
            family_header(out, &name, help(&name), "counter");
            for (labels, value) in series {
                write_metric_line::<&str, u64>(out, &name, None, &labels, None, value, None);
            }
            out.push('\n');
        }

        let gauges = families(&lock(&self.registry.gauges), |g| {
            f64::from_bits(g.load(Relaxed))
        });
        for (name, series) in gauges {
            family_header(out, &name, help(&name), "gauge");
            for (labels, value) in series {
                write_metric_line::<&str, f64>(out, &name, None, &labels, None, value, None);
            }
            out.push('\n');
        }

        let histograms = families(&lock(&self.registry.histograms), |h| {
            let (bounds, counts, sum, _) = h.read(false);
            (bounds, (counts, sum))
        });
        for (name, series) in histograms {
            family_header(out, &name, help(&name), "histogram");
            for (labels, (bounds, (counts, sum))) in series {
                for (le, count) in bounds.iter().zip(&counts) {
                    write_metric_line(
                        out,
                        &name,
                        Some("bucket"),
                        &labels,
                        Some(("le", le)),
                        count,
                        None,
                    );
                }
                let count = counts.last().copied().unwrap_or(0);
                write_metric_line(
                    out,
                    &name,
                    Some("bucket"),
                    &labels,
                    Some(("le", "+Inf")),
                    count,
                    None,
                );
                write_metric_line::<&str, f64>(out, &name, Some("sum"), &labels, None, sum, None);
                write_metric_line::<&str, u64>(
                    out,
                    &name,
                    Some("count"),
                    &labels,
                    None,
                    count,
                    None,
                );
            }
            out.push('\n');
        }
    }

    /// Appends every series as length-delimited protobuf `MetricFamily`
    /// messages, in the text format's order; histograms carry their native
    /// buckets when they keep them.
    pub fn render_protobuf_into(&self, out: &mut Vec<u8>) {
        for family in self.protobuf_families() {
            protobuf::write_delimited(out, &family);
        }
    }

    /// Every series as protobuf `MetricFamily` messages, read now, in the
    /// text format's order: what the protobuf scrape and remote write send.
    pub fn protobuf_families(&self) -> Vec<protobuf::MetricFamily> {
        let descriptions = lock(&self.registry.descriptions);
        let help = |name: &str| descriptions.get(name).map(|d| d.as_ref());
        let mut families = Vec::new();

        for (name, series) in by_name(&lock(&self.registry.counters)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Counter);
            for (key, counter) in series {
                let metric = protobuf::counter(protobuf::labels(key), counter.value());
                family.metric.push(metric);
            }
            families.push(family);
        }
        for (name, series) in by_name(&lock(&self.registry.gauges)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Gauge);
            for (key, gauge) in series {
                let value = f64::from_bits(gauge.load(Relaxed));
                family
                    .metric
                    .push(protobuf::gauge(protobuf::labels(key), value));
            }
            families.push(family);
        }
        for (name, series) in by_name(&lock(&self.registry.histograms)) {
            let mut family = protobuf::family(&name, help(&name), MetricType::Histogram);
            for (key, histogram) in series {
                let (bounds, counts, sum, native) = histogram.read(true);
                family.metric.push(protobuf::histogram(
                    protobuf::labels(key),
                    bounds,
                    &counts,
                    sum,
                    native,
                ));
            }
            families.push(family);
        }
        families
    }
}

/// Writes a family's HELP (when described) and TYPE lines.
pub(crate) fn family_header(out: &mut String, name: &str, help: Option<&str>, kind: &str) {
    if let Some(help) = help {
        write_help_line(out, name, None, None, help);
    }
    write_type_line(out, name, None, None, kind);
}

/// The exporter's label set for a key (the agent sets no global labels).
pub(crate) fn label_set(key: &Key) -> LabelSet {
    LabelSet::from_key_and_global(key, &indexmap::IndexMap::new())
}

/// Series grouped by sanitized name, each with its label set and a value
/// read now, both levels sorted so the page is stable between scrapes.
fn families<M, V>(
    series: &HashMap<Key, M>,
    read: impl Fn(&M) -> V,
) -> BTreeMap<String, Vec<(LabelSet, V)>> {
    by_name(series)
        .into_iter()
        .map(|(name, series)| {
            let series = series
                .into_iter()
                .map(|(key, metric)| (label_set(key), read(metric)))
                .collect();
            (name, series)
        })
        .collect()
}

/// Series grouped by sanitized name, both levels sorted.
fn by_name<M>(series: &HashMap<Key, M>) -> BTreeMap<String, Vec<(&Key, &M)>> {
    let mut by_name: BTreeMap<String, Vec<(&Key, &M)>> = BTreeMap::new();
    for (key, metric) in series {
        by_name
            .entry(sanitize_metric_name(key.name()))
            .or_default()
            .push((key, metric));
    }
    for series in by_name.values_mut() {
        series.sort_by(|a, b| a.0.labels().cmp(b.0.labels()));
    }
    by_name
}
