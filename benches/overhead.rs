//! What metrics cost the agent, measured against the same work without them.
//!
//! Every "metrics_on" case binds its handles to the agent's own
//! `ShardedRecorder`, exactly as `metrics.exporter: prometheus` installs it;
//! every "metrics_off" case binds them to no recorder and no clock, which is
//! what `metrics.enabled: false` gives. Both run in the same process and the
//! same run, so their ratio is fair.
//!
//! The `recorder/*` groups compare the candidates behind the same facade
//! calls: the sharded recorder, and `metrics-exporter-prometheus`'s own
//! recorder (with its histogram upkeep inside the timed loop, as it would
//! run in production). The `registry/*` group compares the recorder's
//! handles and lookups with `metrics_util`'s `Registry<Key, AtomicStorage>`.
//!
//! Run: `cargo bench --bench overhead` (figures in docs/performance.md).

mod common;
use common::{per_thread_time, runtime};

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use agent::config::DEFAULT_CACHE_SIZE;
use agent::peer::Handler;
use agent::storage::{Instrumented, LocalStore, Storage};
use agent::telemetry::{
    self, clock, Exposition, MessageMetrics, ShardedRecorder, StorageOpMetrics,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Upkeep of the exporter's recorder every this many operations: more often
/// than an agent would at any realistic rate, so its cost is if anything
/// overstated.
const UPKEEP_EVERY: u64 = 16 * 1024;

struct Setup {
    recorder: ShardedRecorder,
}

impl Setup {
    fn new() -> Self {
        Self {
            recorder: ShardedRecorder::new(),
        }
    }

    /// Builds `f`'s metric handles against the sharded recorder with the
    /// clock (on) or against none and without the clock (off).
    fn with<T>(&self, on: bool, f: impl FnOnce() -> T) -> T {
        if on {
            metrics::with_local_recorder(&self.recorder, f)
        } else {
            clock::set_timing(false);
            let t = f();
            clock::set_timing(true);
            t
        }
    }
}

fn mode(on: bool) -> &'static str {
    if on {
        "metrics_on"
    } else {
        "metrics_off"
    }
}

/// (a) Each storage operation on the local backend, metrics on and off.
fn storage_ops(c: &mut Criterion) {
    let rt = runtime();
    let setup = Setup::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("storage_local");
    for on in [false, true] {
        let path = dir.path().join(format!("{}.db", mode(on)));
        let store = rt
            .block_on(LocalStore::open(&path, DEFAULT_CACHE_SIZE))
            .expect("open db");
        let store = setup.with(on, || Instrumented::new(store));
        rt.block_on(async {
            for i in 0..1000 {
                store
                    .put(&format!("key{i}"), "value-of-a-typical-size-0123456789")
                    .await
                    .expect("put");
            }
        });
        group.bench_function(BenchmarkId::new("get", mode(on)), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(store.get("key500").await.expect("get")) })
        });
        // Writes commit durably (fsync): milliseconds, so fewer samples.
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(5));
        group.bench_function(BenchmarkId::new("put", mode(on)), |b| {
            b.to_async(&rt)
                .iter(|| async { store.put("key1", "value").await.expect("put") })
        });
        group.bench_function(BenchmarkId::new("delete", mode(on)), |b| {
            b.to_async(&rt)
                .iter(|| async { store.delete("absent").await.expect("delete") })
        });
        group
            .sample_size(100)
            .measurement_time(Duration::from_secs(5));
        rt.block_on(store.close());
    }
    group.finish();
}

/// (b) The message path without sockets: decode, handle, encode.
fn message_path(c: &mut Criterion) {
    let rt = runtime();
    let setup = Setup::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("message");
    for on in [false, true] {
        let store = rt
            .block_on(LocalStore::open(
                &dir.path().join(format!("{}.db", mode(on))),
                DEFAULT_CACHE_SIZE,
            ))
            .expect("open db");
        let handler = setup.with(on, || Handler::new(Instrumented::new(store)));
        rt.block_on(
            handler
                .storage()
                .put("key500", "value-of-a-typical-size-0123456789"),
        )
        .expect("put");
        for (name, line) in [
            ("get", &br#"{"id":17,"op":"get","key":"key500"}"#[..]),
            ("ping", &br#"{"id":17,"op":"ping"}"#[..]),
        ] {
            group.bench_function(BenchmarkId::new(name, mode(on)), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let handler = &handler;
                    async move {
                        let mut out = Vec::with_capacity(256);
                        let start = Instant::now();
                        for _ in 0..iters {
                            out.clear();
                            handler.handle(line, &mut out).await;
                            black_box(&out);
                        }
                        start.elapsed()
                    }
                })
            });
        }
        rt.block_on(handler.storage().close());
    }
    group.finish();
}

/// The exporter's own recorder, configured with the agent's buckets: the
/// candidate the sharded recorder replaced.
fn exporter_recorder() -> (
    metrics_exporter_prometheus::PrometheusRecorder,
    PrometheusHandle,
) {
    let mut builder = PrometheusBuilder::new();
    for def in telemetry::METRICS {
        if let Some(buckets) = def.buckets {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(def.name.to_string()), buckets)
                .expect("buckets");
        }
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

/// The metric work of one message, exactly as the handler and the storage
/// wrapper do it: two clock reads each, a counter and a histogram each.
fn message_metric_work(msg: &MessageMetrics, op: &StorageOpMetrics) {
    let t = msg.duration.start();
    msg.received.increment(1);
    let s = op.duration.start();
    op.duration.record_since(black_box(s));
    op.operations.increment(1);
    msg.duration.record_since(black_box(t));
}

/// (c) The instrumentation alone, and the recorder candidates behind it.
fn instrumentation(c: &mut Criterion) {
    let setup = Setup::new();
    let (exporter, exporter_handle) = exporter_recorder();
    let mut group = c.benchmark_group("instrumentation");
    for (name, on) in [("metrics_off", false), ("sharded", true)] {
        let msg = setup.with(on, MessageMetrics::new);
        let op = setup.with(on, || StorageOpMetrics::new("get", "local"));
        group.bench_function(BenchmarkId::new("per_message_with_storage_op", name), |b| {
            b.iter(|| message_metric_work(&msg, &op))
        });
    }
    let msg = metrics::with_local_recorder(&exporter, MessageMetrics::new);
    let op = metrics::with_local_recorder(&exporter, || StorageOpMetrics::new("get", "local"));
    group.bench_function(
        BenchmarkId::new("per_message_with_storage_op", "exporter_prometheus"),
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    message_metric_work(&msg, &op);
                    if i % UPKEEP_EVERY == 0 {
                        exporter_handle.run_upkeep();
                    }
                }
                start.elapsed()
            })
        },
    );
    // The primitives, for reading the above.
    let msg = setup.with(true, MessageMetrics::new);
    group.bench_function("counter_increment", |b| {
        b.iter(|| msg.received.increment(1))
    });
    let histogram = metrics::with_local_recorder(&setup.recorder, || {
        metrics::histogram!(telemetry::defs::MESSAGE_PROCESSING_DURATION_SECONDS)
    });
    group.bench_function("histogram_record", |b| {
        b.iter(|| histogram.record(black_box(0.000_1)))
    });
    let timer = clock::Timer::if_enabled().expect("timing on");
    group.bench_function("raw_clock_seconds_since", |b| {
        b.iter(|| timer.seconds_since(black_box(timer.now())))
    });
    group.bench_function("quanta_now_elapsed", |b| {
        b.iter(|| black_box(quanta::Instant::now()).elapsed())
    });
    group.bench_function("std_now_elapsed", |b| {
        b.iter(|| black_box(Instant::now()).elapsed())
    });
    group.bench_function("counter_macro_lookup", |b| {
        metrics::with_local_recorder(&setup.recorder, || {
            b.iter(|| {
                metrics::counter!(telemetry::defs::STORAGE_OPERATIONS_TOTAL, "operation" => "get", "backend" => "local")
                    .increment(1)
            })
        })
    });
    group.finish();
}

/// The metric work of a message after other work has pushed its data out of
/// the nearest caches, as the agent's own work and the kernel's do between
/// two messages. The `instrumentation` loop keeps every line it touches in
/// L1 and so measures the metric work at its cheapest; end to end, on a
/// Xeon host, metrics cost more than that loop gives (docs/performance.md,
/// "The peer message path, in time"). Before each message this writes one
/// byte per cache line of a buffer larger than L1 (`evict_l1`, 192 KiB) or
/// than L2 (`evict_l2`, 4 MiB), then times the message's metric work alone.
/// `metrics_off` is the baseline: the same handles without a recorder, so
/// the difference is what the metric work costs with cold caches.
fn cold_instrumentation(c: &mut Criterion) {
    let setup = Setup::new();
    let mut group = c.benchmark_group("instrumentation_cold");
    for (bytes, label) in [(192 << 10, "evict_l1"), (4 << 20, "evict_l2")] {
        let mut evict = vec![0u8; bytes];
        for (name, on) in [("metrics_off", false), ("sharded", true)] {
            let msg = setup.with(on, MessageMetrics::new);
            let op = setup.with(on, || StorageOpMetrics::new("get", "local"));
            group.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        for line in evict.chunks_mut(64) {
                            line[0] = line[0].wrapping_add(1);
                        }
                        black_box(&mut evict);
                        let start = Instant::now();
                        message_metric_work(&msg, &op);
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

/// A counter plus a histogram on the same series from one thread, then from
/// two at once: with per-thread shards the time per record should not rise.
/// Each thread records `iters` times, starting together at a barrier, and
/// times itself; the figure is the mean of the threads' own times.
///
/// Timing the scope from outside, as this did before, measured the slower
/// of the two threads plus their spawn and join.
///
/// `private_cells` is the control: the same three adds (a count, a bucket,
/// an `f64` sum) on cells each thread allocated for itself, so nothing is
/// shared at all. On the 2-vCPU VM two threads of it also run a few percent
/// slower than one (the host's, not the recorder's); the sharded recorder's
/// two-thread figure is to be read against that, not against zero.
fn contention(c: &mut Criterion) {
    let sharded = ShardedRecorder::new();
    let (exporter, exporter_handle) = exporter_recorder();
    let mut group = c.benchmark_group("contention");
    let candidates: [(&str, &dyn metrics::Recorder); 2] =
        [("sharded", &sharded), ("exporter_prometheus", &exporter)];
    for (name, recorder) in candidates {
        let (counter, histogram) = metrics::with_local_recorder(recorder, || {
            (
                metrics::counter!(telemetry::defs::MESSAGES_RECEIVED_TOTAL),
                metrics::histogram!(telemetry::defs::MESSAGE_PROCESSING_DURATION_SECONDS),
            )
        });
        let upkeep = name == "exporter_prometheus";
        let work = |iters: u64| {
            for i in 0..iters {
                counter.increment(1);
                histogram.record(black_box(0.000_3));
                if upkeep && i % UPKEEP_EVERY == 0 {
                    exporter_handle.run_upkeep();
                }
            }
        };
        for threads in [1, 2] {
            group.bench_function(BenchmarkId::new(name, format!("{threads}_threads")), |b| {
                b.iter_custom(|iters| per_thread_time(threads, || work(iters)))
            });
        }
    }
    let private = |iters: u64| {
        // Three cells a page apart, allocated by the thread that writes them.
        let cells: Vec<AtomicU64> = (0..1024).map(|_| AtomicU64::new(0)).collect();
        let (count, bucket, sum) = (&cells[0], &cells[512], &cells[1023]);
        for _ in 0..iters {
            let (count, bucket, sum) = black_box((count, bucket, sum));
            count.store(count.load(Relaxed).wrapping_add(1), Relaxed);
            bucket.store(bucket.load(Relaxed).wrapping_add(1), Relaxed);
            let total = f64::from_bits(sum.load(Relaxed)) + black_box(0.000_3);
            sum.store(total.to_bits(), Relaxed);
        }
    };
    for threads in [1, 2] {
        group.bench_function(
            BenchmarkId::new("private_cells", format!("{threads}_threads")),
            |b| b.iter_custom(|iters| per_thread_time(threads, || private(iters))),
        );
    }
    group.finish();
}

/// (d) Rendering the agent's whole metric set, every series populated,
/// with the process set read from /proc as at a scrape.
fn render(c: &mut Criterion) {
    let setup = Setup::new();
    setup.with(true, || {
        telemetry::defs::describe_all();
        telemetry::handles::record_build_info();
        let msg = MessageMetrics::new();
        msg.received.increment(1);
        msg.duration.record_since(msg.duration.start());
        for reason in agent::peer::protocol::FailReason::ALL {
            msg.failed(reason).increment(1);
        }
        // An agent runs one backend, so it exposes one backend's series.
        for op in ["get", "put", "delete"] {
            let m = StorageOpMetrics::new(op, "local");
            m.operations.increment(1);
            m.duration.record_since(m.duration.start());
        }
        let peers = telemetry::PeerMetrics::new();
        peers.connected.set(3.0);
    });
    let exposition = Exposition {
        recorder: setup.recorder.clone(),
        process: telemetry::ProcessCollector::new(Duration::from_secs(5)),
    };
    c.bench_function("render/full_metric_set", |b| {
        b.iter(|| black_box(exposition.render()))
    });
}

/// (e) Could `metrics_util::registry::Registry` hold the recorder's series?
///
/// Issue #31 asks whether `Registry<Key, AtomicStorage>`, the registry
/// `metrics-util` ships, could replace the recorder's own map at the same
/// cost. One iteration is the storage work of a message: a counter
/// increment and a histogram sample, on a series with the two labels the
/// storage metrics carry.
/// - `lookup/*`: the series is looked up for every record, through
///   `Registry::get_or_create_*` or the sharded recorder's `register_*`.
/// - `handle/*`, `handle_2_threads/*`: the handle is looked up once and
///   cached, as the agent's `MessageMetrics` and `StorageOpMetrics` do;
///   the registry is then out of the path, and what is left is the storage
///   it hands out. `AtomicStorage` gives one shared `AtomicU64` per counter
///   and an `AtomicBucket` of samples per histogram, which grows until it
///   is drained: it is drained every `UPKEEP_EVERY` records inside the
///   timed loop, as a scrape or an upkeep task would.
///
/// Figures: docs/performance.md, "Could metrics_util's Registry serve as
/// the registry?".
fn registry(c: &mut Criterion) {
    use metrics::{Key, Label, Level, Metadata, Recorder as _};
    use metrics_util::registry::Registry;
    use std::sync::Arc;

    const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);
    let labels = || {
        vec![
            Label::new("operation", "get"),
            Label::new("backend", "local"),
        ]
    };
    let counter_key = Key::from_parts(telemetry::defs::STORAGE_OPERATIONS_TOTAL, labels());
    let histogram_key = Key::from_parts(
        telemetry::defs::STORAGE_OPERATION_DURATION_SECONDS,
        labels(),
    );
    let sharded = ShardedRecorder::new();
    let atomic = Registry::atomic();
    let mut group = c.benchmark_group("registry");

    group.bench_function(BenchmarkId::new("lookup", "sharded"), |b| {
        b.iter(|| {
            sharded.register_counter(&counter_key, &META).increment(1);
            sharded
                .register_histogram(&histogram_key, &META)
                .record(black_box(0.000_3));
        })
    });
    group.bench_function(BenchmarkId::new("lookup", "atomic_storage"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                atomic.get_or_create_counter(&counter_key, |c| metrics::CounterFn::increment(c, 1));
                atomic.get_or_create_histogram(&histogram_key, |h| h.push(black_box(0.000_3)));
                if i % UPKEEP_EVERY == 0 {
                    atomic.get_or_create_histogram(&histogram_key, |h| h.clear_with(|_| ()));
                }
            }
            start.elapsed()
        })
    });

    let sharded_handles = (
        sharded.register_counter(&counter_key, &META),
        sharded.register_histogram(&histogram_key, &META),
    );
    let bucket = atomic.get_or_create_histogram(&histogram_key, Arc::clone);
    let atomic_handles = (
        metrics::Counter::from_arc(atomic.get_or_create_counter(&counter_key, Arc::clone)),
        metrics::Histogram::from_arc(Arc::clone(&bucket)),
    );
    let candidates = [
        ("sharded", &sharded_handles, None),
        ("atomic_storage", &atomic_handles, Some(&bucket)),
    ];
    for (name, (counter, histogram), drain) in candidates {
        let work = |iters: u64| {
            for i in 0..iters {
                counter.increment(1);
                histogram.record(black_box(0.000_3));
                if let Some(bucket) = drain {
                    if i % UPKEEP_EVERY == 0 {
                        bucket.clear_with(|_| ());
                    }
                }
            }
        };
        group.bench_function(BenchmarkId::new("handle", name), |b| {
            b.iter_custom(|iters| per_thread_time(1, || work(iters)))
        });
        group.bench_function(BenchmarkId::new("handle_2_threads", name), |b| {
            b.iter_custom(|iters| per_thread_time(2, || work(iters)))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    instrumentation,
    cold_instrumentation,
    contention,
    render,
    registry,
    message_path,
    storage_ops
);
criterion_main!(benches);
