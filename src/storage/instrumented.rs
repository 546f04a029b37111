//! The one place storage metrics are recorded, for any backend.

use std::future::Future;
use std::sync::Arc;

use super::{Health, HealthObserver, Storage, StorageError};
use crate::config::BackendKind;
use crate::telemetry::{StorageHealthMetrics, StorageOpMetrics};

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
            inner,
        }
    }

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

async fn measured<T>(
    m: &StorageOpMetrics,
    op: impl Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let start = m.duration.start();
    let result = op.await;
    m.duration.record_since(start);
    m.operations.increment(1);
    if result.is_err() {
        m.errors.increment(1);
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
        measured(&self.get, self.inner.get(key)).await
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), StorageError> {
        measured(&self.put, self.inner.put(key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StorageError> {
        measured(&self.delete, self.inner.delete(key)).await
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
                Err(StorageError::Unavailable("down".into()))
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
