//! What metrics cost the agent, measured against the same work without them.
//!
//! Every "metrics_on" case binds its handles to a real Prometheus recorder
//! (configured exactly as the agent configures it); every "metrics_off" case
//! binds them to no recorder, which is what `metrics.enabled: false` gives.
//! Both run in the same process and the same run, so their ratio is fair.
//! Histogram upkeep (draining samples into buckets) runs inside the timed
//! loop at the agent's cadence, so its cost is included, as in production.
//!
//! Run: `cargo bench --bench overhead` (figures in docs/performance.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use agent::handler::Handler;
use agent::storage::{Instrumented, LocalStore, Storage};
use agent::telemetry::{self, MessageMetrics, StorageOpMetrics};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};

/// Upkeep every this many operations: more often than the agent's upkeep
/// (every 250 ms) at any realistic rate, so the cost is if anything overstated.
const UPKEEP_EVERY: u64 = 16 * 1024;

struct Setup {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Setup {
    fn new() -> Self {
        let recorder = telemetry::prometheus_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    /// Builds `f`'s metric handles against the Prometheus recorder (on) or
    /// against none (off).
    fn with<T>(&self, on: bool, f: impl FnOnce() -> T) -> T {
        if on {
            metrics::with_local_recorder(&self.recorder, f)
        } else {
            f()
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// (a) Each storage operation on the local backend, metrics on and off.
fn storage_ops(c: &mut Criterion) {
    let rt = runtime();
    let setup = Setup::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("storage_local");
    for on in [false, true] {
        let path = dir.path().join(format!("{}.db", mode(on)));
        let store = rt.block_on(LocalStore::open(&path)).expect("open db");
        let store = setup.with(on, || Instrumented::new(store));
        rt.block_on(async {
            for i in 0..1000 {
                store
                    .put(&format!("key{i}"), "value-of-a-typical-size-0123456789")
                    .await
                    .expect("put");
            }
        });
        let handle = setup.handle.clone();
        group.bench_function(BenchmarkId::new("get", mode(on)), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, handle) = (&store, &handle);
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(store.get("key500").await.expect("get"));
                        if i % UPKEEP_EVERY == 0 {
                            handle.run_upkeep();
                        }
                    }
                    start.elapsed()
                }
            })
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
            let handle = setup.handle.clone();
            group.bench_function(BenchmarkId::new(name, mode(on)), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (handler, handle) = (&handler, &handle);
                    async move {
                        let mut out = Vec::with_capacity(256);
                        let start = Instant::now();
                        for i in 0..iters {
                            out.clear();
                            handler.handle(line, &mut out).await;
                            black_box(&out);
                            if i % UPKEEP_EVERY == 0 {
                                handle.run_upkeep();
                            }
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

/// (c) The instrumentation alone, exactly as the handler and the storage
/// wrapper record it, with the Prometheus recorder.
fn instrumentation(c: &mut Criterion) {
    let setup = Setup::new();
    let msg = setup.with(true, MessageMetrics::new);
    let op = setup.with(true, || StorageOpMetrics::new("get", "local"));
    let handle = setup.handle.clone();
    let mut group = c.benchmark_group("instrumentation");
    let timed = |b: &mut criterion::Bencher, body: &dyn Fn()| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                body();
                if i % UPKEEP_EVERY == 0 {
                    handle.run_upkeep();
                }
            }
            start.elapsed()
        })
    };
    let per_message = || {
        let t = quanta::Instant::now();
        msg.received.increment(1);
        msg.duration.record(black_box(t).elapsed());
    };
    let per_storage_op = || {
        let t = quanta::Instant::now();
        op.duration.record(black_box(t).elapsed());
        op.operations.increment(1);
    };
    group.bench_function("per_message", |b| timed(b, &per_message));
    group.bench_function("per_storage_op", |b| timed(b, &per_storage_op));
    group.bench_function("per_message_with_storage_op", |b| {
        timed(b, &|| {
            per_message();
            per_storage_op();
        })
    });
    // The primitives, for reading the above.
    group.bench_function("counter_increment", |b| {
        b.iter(|| msg.received.increment(1))
    });
    group.bench_function("histogram_record", |b| {
        timed(b, &|| msg.duration.record(black_box(0.000_1)))
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

/// (d) Rendering the agent's whole metric set, every series populated.
fn render(c: &mut Criterion) {
    let setup = Setup::new();
    setup.with(true, || {
        telemetry::defs::describe_all();
        telemetry::defs::record_build_info();
        let msg = MessageMetrics::new();
        msg.received.increment(1);
        msg.duration.record(0.001);
        for reason in agent::protocol::FailReason::ALL {
            msg.failed(reason).increment(1);
        }
        // An agent runs one backend, so it exposes one backend's series.
        for op in ["get", "put", "delete"] {
            let m = StorageOpMetrics::new(op, "local");
            m.operations.increment(1);
            m.duration.record(0.000_2);
        }
        let peers = telemetry::PeerMetrics::new();
        peers.connected.set(3.0);
        let mut sampler = telemetry::process::ProcessSampler::new();
        sampler.sample();
    });
    let handle = setup.handle.clone();
    c.bench_function("render/full_metric_set", |b| {
        b.iter(|| black_box(handle.render()))
    });
}

criterion_group!(benches, instrumentation, render, message_path, storage_ops);
criterion_main!(benches);
