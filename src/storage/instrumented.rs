//! The one place storage metrics are recorded, for any backend.

use std::future::Future;

use super::{Storage, StorageError};
use crate::config::BackendKind;
use crate::telemetry::StorageOpMetrics;

/// Wraps a [`Storage`] and records `storage_operations_total`,
/// `storage_operation_errors_total` and `storage_operation_duration_seconds`
/// for every operation, labelled with the wrapped backend.
pub struct Instrumented<S> {
    inner: S,
    get: StorageOpMetrics,
    put: StorageOpMetrics,
    delete: StorageOpMetrics,
}

impl<S: Storage> Instrumented<S> {
    /// Creates the metric handles against the recorder installed now.
    pub fn new(inner: S) -> Self {
        let backend = inner.backend().as_str();
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
        STORAGE_OPERATIONS_TOTAL, STORAGE_OPERATION_DURATION_SECONDS,
        STORAGE_OPERATION_ERRORS_TOTAL,
    };
    use crate::test_support::{counter, histogram_count};
    use metrics_util::debugging::DebuggingRecorder;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A backend whose failures the test switches on and off.
    struct Flaky {
        fail: AtomicBool,
    }

    impl Storage for Flaky {
        fn backend(&self) -> BackendKind {
            BackendKind::Redis
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
}
