//! The one place storage metrics are recorded, and storage failures
//! logged, for any backend.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Health, HealthObserver, Storage, StorageError};
use crate::config::BackendKind;
use crate::telemetry::Throttle;
use crate::telemetry::{StorageHealthMetrics, StorageOpMetrics};

/// At most one storage-failure warning per this period; the next one says
/// how many similar failures were not logged.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(1);

/// Wraps a [`Storage`] and records `storage_operations_total`,
/// `storage_operation_errors_total` and `storage_operation_duration_seconds`
/// for every operation, labelled with the wrapped backend; and, through an
/// observer on the backend's [`Health`], `agent_storage_up` and
/// `agent_storage_panics_total`.
pub struct Instrumented<S> {
    inner: S,
    get: StorageOpMetrics,
    put: StorageOpMetrics,
    delete: StorageOpMetrics,
    /// Per operation: a failing put must not be declared over by a get
    /// that succeeds (reads keep working while a disk is full).
    failures: [FailureLog; 3],
}

/// Logs one operation's failures at warn (operation, backend, error), at
/// most one line per [`FAILURE_LOG_PERIOD`] with a count of those
/// suppressed, and its recovery once, at info: an outage at any error rate
/// writes about a line a second, and its end is in the log too.
struct FailureLog {
    operation: &'static str,
    backend: &'static str,
    /// Whether the last operation failed: the one thing a success checks,
    /// so that the success path costs one relaxed load.
    failing: AtomicBool,
    /// The throttle, and failures since the last success.
    state: Mutex<(Throttle, u64)>,
}

impl FailureLog {
    fn new(operation: &'static str, backend: &'static str) -> Self {
        Self {
            operation,
            backend,
            failing: AtomicBool::new(false),
            state: Mutex::new((Throttle::new(FAILURE_LOG_PERIOD), 0)),
        }
    }

    fn failed(&self, error: &StorageError) {
        let operation = self.operation;
        self.failing.store(true, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        match state.0.allow() {
            Some(suppressed) => tracing::warn!(
                operation,
                backend = self.backend,
                error = %error,
                suppressed,
                "storage operation failed"
            ),
            None => {
                tracing::debug!(operation, backend = self.backend, error = %error, "storage operation failed")
            }
        }
    }

    fn succeeded(&self) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.failing.swap(false, Ordering::Relaxed) {
            let failed = std::mem::take(&mut state.1);
            // The next outage's first failure is logged at once.
            state.0 = Throttle::new(FAILURE_LOG_PERIOD);
            tracing::info!(
                operation = self.operation,
                backend = self.backend,
                failed_operations = failed,
                "storage operations succeed again"
            );
        }
    }
}

impl<S: Storage> Instrumented<S> {
    /// Creates the metric handles against the recorder installed now, and
    /// starts recording the backend's health (its current state at once).
    pub fn new(inner: S) -> Self {
        let backend = inner.backend().as_str();
        inner
            .health()
            .observe(Arc::new(HealthMetrics(StorageHealthMetrics::new(backend))));
        Self {
            get: StorageOpMetrics::new("get", backend),
            put: StorageOpMetrics::new("put", backend),
            delete: StorageOpMetrics::new("delete", backend),
            failures: ["get", "put", "delete"].map(|op| FailureLog::new(op, backend)),
            inner,
        }
    }

    /// The wrapped store, for what the wrapper does not measure.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// Records what the backend's health reports.
struct HealthMetrics(StorageHealthMetrics);

impl HealthObserver for HealthMetrics {
    fn availability(&self, up: bool) {
        self.0.up.set(if up { 1.0 } else { 0.0 });
    }

    fn panicked(&self) {
        self.0.panics.increment(1);
    }
}

/// Runs and measures one operation. It takes the operation as a closure,
/// not as a future: an `async fn` keeps a future argument in its state and
/// then a second copy of it for the `.await`, which made the wrapper's
/// future twice the size of the backend's and cost more instructions per
/// local get (callgrind; docs/performance-history.md, "The agent's own
/// instructions per message, and two fixes").
async fn measured<T, F: Future<Output = Result<T, StorageError>>>(
    m: &StorageOpMetrics,
    log: &FailureLog,
    op: impl FnOnce() -> F,
) -> Result<T, StorageError> {
    let start = m.duration.start();
    let result = op().await;
    m.duration.record_since(start);
    m.operations.increment(1);
    match &result {
        Ok(_) => log.succeeded(),
        Err(e) => {
            m.errors.increment(1);
            log.failed(e);
        }
    }
    result
}

impl<S: Storage> Storage for Instrumented<S> {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }

    fn health(&self) -> &Health {
        self.inner.health()
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        measured(&self.get, &self.failures[0], || self.inner.get(key)).await
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        measured(&self.put, &self.failures[1], || self.inner.put(key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        measured(&self.delete, &self.failures[2], || self.inner.delete(key)).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::defs::{
        AGENT_STORAGE_PANICS_TOTAL, AGENT_STORAGE_UP, STORAGE_OPERATIONS_TOTAL,
        STORAGE_OPERATION_DURATION_SECONDS, STORAGE_OPERATION_ERRORS_TOTAL,
    };
    use crate::test_support::{counter, gauge, histogram_count};
    use metrics_util::debugging::DebuggingRecorder;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A backend whose failures the test switches on and off.
    struct Flaky {
        fail: AtomicBool,
        health: Health,
    }

    impl Storage for Flaky {
        fn backend(&self) -> BackendKind {
            BackendKind::Redis
        }
        fn health(&self) -> &Health {
            &self.health
        }
        async fn get(&self, _key: &str) -> Result<Option<String>, StorageError> {
            self.result(None)
        }
        async fn put(&self, _key: &str, _value: &str) -> Result<(), StorageError> {
            self.result(())
        }
        async fn delete(&self, _key: &str) -> Result<bool, StorageError> {
            self.result(true)
        }
        async fn close(&self) {}
    }

    impl Flaky {
        fn result<T>(&self, ok: T) -> Result<T, StorageError> {
            if self.fail.load(Ordering::Relaxed) {
                Err(StorageError::Refused("down".into()))
            } else {
                Ok(ok)
            }
        }
    }

    #[tokio::test]
    async fn counts_every_operation_and_error_with_labels() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let store = metrics::with_local_recorder(&recorder, || {
            Instrumented::new(Flaky {
                fail: AtomicBool::new(false),
                health: Health::new(BackendKind::Redis),
            })
        });
        for _ in 0..3 {
            store.put("k", "v").await.unwrap();
        }
        store.get("k").await.unwrap();
        store.inner().fail.store(true, Ordering::Relaxed);
        store.get("k").await.unwrap_err();
        store.delete("k").await.unwrap_err();

        let snap = snapshotter.snapshot().into_vec();
        let labels = |op: &'static str| vec![("operation", op), ("backend", "redis")];
        assert_eq!(counter(&snap, STORAGE_OPERATIONS_TOTAL, &labels("put")), 3);
        assert_eq!(counter(&snap, STORAGE_OPERATIONS_TOTAL, &labels("get")), 2);
        assert_eq!(
            counter(&snap, STORAGE_OPERATIONS_TOTAL, &labels("delete")),
            1
        );
        assert_eq!(
            counter(&snap, STORAGE_OPERATION_ERRORS_TOTAL, &labels("put")),
            0
        );
        assert_eq!(
            counter(&snap, STORAGE_OPERATION_ERRORS_TOTAL, &labels("get")),
            1
        );
        assert_eq!(
            counter(&snap, STORAGE_OPERATION_ERRORS_TOTAL, &labels("delete")),
            1
        );
        assert_eq!(
            histogram_count(&snap, STORAGE_OPERATION_DURATION_SECONDS, &labels("put")),
            3
        );
        assert_eq!(
            histogram_count(&snap, STORAGE_OPERATION_DURATION_SECONDS, &labels("get")),
            2
        );
        assert_eq!(
            histogram_count(&snap, STORAGE_OPERATION_DURATION_SECONDS, &labels("delete")),
            1
        );
    }

    #[tokio::test]
    async fn records_health_transitions_and_panics_of_the_backend() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let health = Health::new(BackendKind::Redis);
        let store = metrics::with_local_recorder(&recorder, || {
            Instrumented::new(Flaky {
                fail: AtomicBool::new(false),
                health: health.clone(),
            })
        });
        let backend = [("backend", "redis")];
        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(gauge(&snap, AGENT_STORAGE_UP, &backend), 1.0);
        assert_eq!(counter(&snap, AGENT_STORAGE_PANICS_TOTAL, &backend), 0);

        store.health().set_down("Redis unreachable");
        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(gauge(&snap, AGENT_STORAGE_UP, &backend), 0.0);
        health.set_up();
        health.record_panic();
        health.record_panic();
        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(gauge(&snap, AGENT_STORAGE_UP, &backend), 1.0);
        assert_eq!(counter(&snap, AGENT_STORAGE_PANICS_TOTAL, &backend), 2);
    }
}
