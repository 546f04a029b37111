//! What native histograms cost: one sample, one sample from two threads at
//! once, and a scrape.
//!
//! Every native case uses the same layout: schema 3 (bucket factor 1.1),
//! at most 160 buckets, zero threshold 2^-128. Every classic case uses the
//! agent's 19 latency bounds (`defs::LATENCY_BUCKETS`).
//!
//! - `native_record`: one histogram sample, each case in the same run and
//!   over the same 64 latency-like values (5 µs to 50 ms, log-spaced, in a
//!   fixed shuffled order, cycled so that branch prediction sees the mix a
//!   real series sees). The cases:
//!   - `agent_classic`: `ShardedRecorder::new()`, classic buckets only;
//!   - `agent_native`: `ShardedRecorder::with_native`, classic and native
//!     buckets, as `metrics.native_histograms.enabled` runs it;
//!   - `exporter_prometheus_native`: metrics-exporter-prometheus 0.18's own
//!     native histogram (`set_native_histogram_for_metric`, which replaces
//!     the classic buckets: native only). Its record only queues the sample;
//!     the buckets are filled when the queue is drained, at upkeep or at a
//!     scrape. Upkeep runs every 16 Ki samples inside the timed loop, so the
//!     figure includes that work, amortized, as production would pay it;
//!   - `exporter_prometheus_classic`: the same exporter with the agent's
//!     classic buckets, the same upkeep, for reference;
//!   - `prometheus_client_classic_native`: prometheus-client's `Histogram`
//!     with classic and native buckets (`new_classic_and_native`), the same
//!     shape as `agent_native` (0.26 has native histograms);
//!   - `prometheus_client_native`: its native buckets only, the shape of
//!     `exporter_prometheus_native`;
//!   - `prometheus_client_classic`: its classic buckets only, the shape of
//!     `agent_classic`.
//! - `native_contention`: one series of the agent's recorder, native on
//!   (`native`) and off (`classic`, for reference), recorded from one thread
//!   and then from two at once. Each thread records `iters` samples, starting
//!   together at a barrier, and times itself; the figure is the mean of the
//!   threads' own times per sample, so with no contention at all the two
//!   figures would be equal. As in overhead.rs's `contention`, read the
//!   two-thread figure against the host's own noise (a few percent on a
//!   2-vCPU VM), not against zero.
//! - `scrape_render`: the whole `/metrics` page (every metric the message
//!   and storage paths record, a real handler's traffic and 10,000 latency
//!   samples in each histogram, the process set read from /proc), rendered
//!   as text and as protobuf with native on, and both again with native off.
//!
//! After each group a `ratio:` line compares the medians that criterion
//! reports (the same samples).
//!
//! Run: `cargo bench --bench native` (a shorter run:
//! `cargo bench --bench native -- --warm-up-time 1 --measurement-time 3`).

mod common;
use common::{per_thread_time, runtime};

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use agent::config::DEFAULT_CACHE_SIZE;
use agent::peer::Handler;
use agent::storage::{Instrumented, LocalStore, Storage};
use agent::telemetry::defs::{
    self, LATENCY_BUCKETS, MESSAGE_PROCESSING_DURATION_SECONDS, STORAGE_OPERATION_DURATION_SECONDS,
};
use agent::telemetry::native::NativeSettings;
use agent::telemetry::{self, Exposition, ShardedRecorder};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use metrics::{Key, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, NativeHistogramConfig, PrometheusBuilder};
use prometheus_client::metrics::histogram::{
    Histogram as ClientHistogram, NativeHistogramConfig as ClientNativeConfig,
};

/// The series every `native_record` and `native_contention` case records.
const SERIES: &str = MESSAGE_PROCESSING_DURATION_SECONDS;

/// Schema 3: bucket factor 2^(1/8) ≈ 1.09, the largest at most 1.1.
const SCHEMA: i32 = 3;
const BUCKET_FACTOR: f64 = 1.1;
const MAX_BUCKETS: u32 = 160;

/// Prometheus's recommended zero threshold, 2^-128.
fn zero_threshold() -> f64 {
    2f64.powi(-128)
}

fn native_settings() -> NativeSettings {
    NativeSettings {
        schema: SCHEMA,
        max_buckets: MAX_BUCKETS,
        zero_threshold: zero_threshold(),
    }
}

/// Upkeep of the exporter's recorder every this many samples, as in
/// overhead.rs: more often than an agent would need.
const UPKEEP_EVERY: u64 = 16 * 1024;

/// Samples per case. Set on every group, so that the last `SAMPLES` calls
/// of a case's routine are criterion's measurement (its warm-up's come
/// first), whatever the command line asks.
const SAMPLES: usize = 100;

/// 64 latencies from 5 µs to 50 ms, evenly spaced in log, in an order
/// shuffled once with a fixed seed.
fn latencies() -> [f64; 64] {
    let mut values: [f64; 64] = std::array::from_fn(|i| 5e-6 * 1e4f64.powf(i as f64 / 63.0));
    // Fisher-Yates with xorshift64: deterministic, no pattern a predictor
    // would learn short of the whole 64-sample period.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..values.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        values.swap(i, (state % (i as u64 + 1)) as usize);
    }
    values
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, None)
}

fn register(recorder: &dyn Recorder) -> metrics::Histogram {
    recorder.register_histogram(&Key::from_static_name(SERIES), &metadata())
}

/// Each case's time per iteration in every call of its routine, for the
/// `ratio:` lines. Criterion's median is the median of its samples' times
/// per iteration; the samples are the last [`SAMPLES`] calls.
#[derive(Default)]
struct Medians(RefCell<HashMap<String, Vec<f64>>>);

impl Medians {
    /// Notes one call's time and passes it on to criterion.
    fn note(&self, id: &str, iters: u64, time: Duration) -> Duration {
        self.0
            .borrow_mut()
            .entry(id.to_string())
            .or_default()
            .push(time.as_secs_f64() * 1e9 / iters.max(1) as f64);
        time
    }

    /// The median of `id`'s measured samples, in ns; None when it was not
    /// run in full (filtered out, or `--test`).
    fn median(&self, id: &str) -> Option<f64> {
        let all = self.0.borrow();
        let times = all.get(id)?;
        if times.len() < SAMPLES {
            return None;
        }
        let mut last = times[times.len() - SAMPLES..].to_vec();
        last.sort_by(f64::total_cmp);
        Some((last[SAMPLES / 2 - 1] + last[SAMPLES / 2]) / 2.0)
    }

    /// Prints `a / b` of the two cases' medians, when both ran.
    fn ratio(&self, group: &str, a: &str, b: &str) {
        if let (Some(x), Some(y)) = (self.median(a), self.median(b)) {
            println!(
                "ratio: {group}: {a} / {b} = {:.2}x ({x:.2} ns / {y:.2} ns)",
                x / y
            );
        }
    }
}

/// Times `iters` samples into `record`, cycling through `values`.
fn record_loop(iters: u64, values: &[f64; 64], record: impl Fn(f64)) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        record(black_box(values[(i & 63) as usize]));
    }
    start.elapsed()
}

/// (1) One sample into one histogram, every candidate.
fn native_record(c: &mut Criterion) {
    let values = latencies();
    let medians = Medians::default();

    let classic = ShardedRecorder::new();
    let native = ShardedRecorder::with_native(Some(native_settings()));
    let exporter_native = PrometheusBuilder::new()
        .set_native_histogram_for_metric(
            Matcher::Full(SERIES.to_string()),
            NativeHistogramConfig::new(BUCKET_FACTOR, MAX_BUCKETS, zero_threshold())
                .expect("native histogram config"),
        )
        .build_recorder();
    let exporter_classic = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(SERIES.to_string()), LATENCY_BUCKETS)
        .expect("buckets")
        .build_recorder();
    let client_config = ClientNativeConfig::with_schema(SCHEMA as i8)
        .zero_threshold(zero_threshold())
        .max_buckets(MAX_BUCKETS as usize);
    let client_classic_native =
        ClientHistogram::new_classic_and_native(LATENCY_BUCKETS.iter().copied(), client_config);
    let client_native = ClientHistogram::new_native(client_config);
    let client_classic = ClientHistogram::new(LATENCY_BUCKETS.iter().copied());

    let mut group = c.benchmark_group("native_record");
    group.sample_size(SAMPLES);
    let agent: [(&str, &ShardedRecorder); 2] =
        [("agent_classic", &classic), ("agent_native", &native)];
    for (name, recorder) in agent {
        let histogram = register(recorder);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = record_loop(iters, &values, |v| histogram.record(v));
                medians.note(name, iters, t)
            })
        });
    }
    let exporters = [
        ("exporter_prometheus_native", &exporter_native),
        ("exporter_prometheus_classic", &exporter_classic),
    ];
    for (name, recorder) in exporters {
        let histogram = register(recorder);
        let handle = recorder.handle();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    histogram.record(black_box(values[(i & 63) as usize]));
                    if i % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
                        handle.run_upkeep();
                    }
                }
                medians.note(name, iters, start.elapsed())
            })
        });
        // Leave nothing queued for the next sample's loop.
        handle.run_upkeep();
    }
    let clients = [
        ("prometheus_client_classic_native", &client_classic_native),
        ("prometheus_client_native", &client_native),
        ("prometheus_client_classic", &client_classic),
    ];
    for (name, histogram) in clients {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = record_loop(iters, &values, |v| histogram.observe(v));
                medians.note(name, iters, t)
            })
        });
    }
    group.finish();
    let g = "native_record";
    medians.ratio(g, "agent_native", "exporter_prometheus_native");
    medians.ratio(g, "agent_native", "prometheus_client_classic_native");
    medians.ratio(g, "agent_native", "prometheus_client_native");
    medians.ratio(g, "agent_native", "agent_classic");
    medians.ratio(g, "agent_classic", "exporter_prometheus_classic");
    medians.ratio(g, "agent_classic", "prometheus_client_classic");
}

/// (2) One series recorded from one thread, then from two at once.
fn native_contention(c: &mut Criterion) {
    let values = latencies();
    let medians = Medians::default();
    let mut group = c.benchmark_group("native_contention");
    group.sample_size(SAMPLES);
    for (name, settings) in [("native", Some(native_settings())), ("classic", None)] {
        // A recorder of its own, whose series the main thread never
        // records: the threads below each get a shard of their own.
        let recorder = ShardedRecorder::with_native(settings);
        let histogram = register(&recorder);
        let work = |iters: u64| {
            record_loop(iters, &values, |v| histogram.record(v));
        };
        for threads in [1, 2] {
            let id = format!("{name}/{threads}_threads");
            group.bench_function(BenchmarkId::new(name, format!("{threads}_threads")), |b| {
                b.iter_custom(|iters| {
                    let t = per_thread_time(threads, || work(iters));
                    medians.note(&id, iters, t)
                })
            });
        }
    }
    group.finish();
    let g = "native_contention";
    medians.ratio(g, "native/2_threads", "native/1_threads");
    medians.ratio(g, "classic/2_threads", "classic/1_threads");
    medians.ratio(g, "native/1_threads", "classic/1_threads");
}

/// A recorder holding the agent's whole metric set, as a running agent's
/// holds it: the handler and the storage wrapper over a local store (so
/// every metric the message and storage paths record, the storage health
/// series included), 100 of each kind of message through it, then 10,000
/// latency samples from 5 µs to 50 ms in each of its histograms, so that
/// the native ones hold about as many buckets as such a range gives
/// (about 110 at schema 3).
fn populated(native: Option<NativeSettings>, rt: &tokio::runtime::Runtime) -> ShardedRecorder {
    let recorder = ShardedRecorder::with_native(native);
    let dir = tempfile::tempdir().expect("tempdir");
    metrics::with_local_recorder(&recorder, || {
        defs::describe_all();
        telemetry::handles::record_build_info();
        let peers = telemetry::PeerMetrics::new();
        peers.connected.set(3.0);
        peers.configured.set(3.0);
        let store = rt
            .block_on(LocalStore::open(
                &dir.path().join("render.db"),
                DEFAULT_CACHE_SIZE,
            ))
            .expect("open db");
        let handler = Handler::new(Instrumented::new(store));
        rt.block_on(async {
            let mut out = Vec::with_capacity(256);
            for line in [
                &br#"{"id":1,"op":"put","key":"k","value":"v"}"#[..],
                br#"{"id":2,"op":"get","key":"k"}"#,
                br#"{"id":3,"op":"delete","key":"k"}"#,
                br#"{"id":4,"op":"ping"}"#,
                br#"{"id":5,"op":"nonsense"}"#,
                br#"not json"#,
            ] {
                for _ in 0..100 {
                    out.clear();
                    handler.handle(line, &mut out).await;
                }
            }
            handler.storage().close().await;
        });
        let names = defs::def(STORAGE_OPERATION_DURATION_SECONDS).labels;
        let mut histograms = vec![metrics::histogram!(MESSAGE_PROCESSING_DURATION_SECONDS)];
        for op in ["get", "put", "delete"] {
            let labels = [(names[0], op), (names[1], "local")];
            histograms.push(metrics::histogram!(
                STORAGE_OPERATION_DURATION_SECONDS,
                &labels
            ));
        }
        for h in &histograms {
            for i in 0..10_000 {
                h.record(5e-6 * 1e4f64.powf(f64::from(i) / 9_999.0));
            }
        }
    });
    recorder
}

/// (3) Rendering the whole page, text and protobuf, native on and off.
fn scrape_render(c: &mut Criterion) {
    let rt = runtime();
    let medians = Medians::default();
    let mut group = c.benchmark_group("scrape_render");
    group.sample_size(SAMPLES);
    for (mode, native) in [("native_on", Some(native_settings())), ("native_off", None)] {
        let exposition = Exposition {
            recorder: populated(native, &rt),
            process: telemetry::ProcessCollector::new(Duration::from_secs(5)),
        };
        let text = exposition.render();
        let protobuf = exposition.render_protobuf();
        println!(
            "scrape_render/{mode}: text {} bytes, protobuf {} bytes",
            text.len(),
            protobuf.len()
        );
        for format in ["text", "protobuf"] {
            let id = format!("{format}/{mode}");
            group.bench_function(BenchmarkId::new(format, mode), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        if format == "text" {
                            black_box(exposition.render());
                        } else {
                            black_box(exposition.render_protobuf());
                        }
                    }
                    medians.note(&id, iters, start.elapsed())
                })
            });
        }
    }
    group.finish();
    let g = "scrape_render";
    medians.ratio(g, "protobuf/native_on", "text/native_on");
    medians.ratio(g, "protobuf/native_off", "text/native_off");
    medians.ratio(g, "protobuf/native_on", "protobuf/native_off");
    medians.ratio(g, "text/native_on", "text/native_off");
}

criterion_group!(benches, native_record, native_contention, scrape_render);
criterion_main!(benches);
