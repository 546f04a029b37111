//! Whether the store can serve right now, and if not, why: one shared cell
//! that the backend updates and `/ready` and `agent_storage_up` report.
//!
//! Backends report what they find; `Health` logs the transitions (never
//! each failed operation, so a full disk or a Redis outage writes a handful
//! of lines, not one per request) and tells its [`HealthObserver`]. The
//! instrumented wrapper installs the observer that records the metrics, so
//! storage code never touches metrics and metrics never poll storage.

use std::sync::{Arc, Mutex, PoisonError};

use crate::config::BackendKind;

/// Told what a [`Health`] learns. The instrumented wrapper's observer
/// records `agent_storage_up` and `agent_storage_panics_total`.
pub trait HealthObserver: Send + Sync {
    /// The store became usable (`true`) or stopped being usable (`false`).
    /// Also called once with the current state when the observer is installed.
    fn availability(&self, up: bool);
    /// A panic in a storage thread was caught.
    fn panicked(&self);
}

/// Handle on a store's health; clones share the same state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `backend` field of the log lines.
    backend: BackendKind,
    state: Mutex<State>,
}

struct State {
    condition: Condition,
    /// Installed once by the instrumented wrapper; `None` in bare stores.
    observer: Option<Arc<dyn HealthObserver>>,
}

/// What `Health` knows. The reasons are text on purpose: each is one
/// sentence for operators (the `/ready` body, a log field, the reason a
/// refused peer is given), which a backend may compose from several causes;
/// nothing branches on them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Condition {
    Up,
    /// Not usable, and may come back by itself (a full disk, Redis down).
    Down(String),
    /// Not usable until the agent is restarted (a deleted or damaged file).
    Failed(String),
}

impl Health {
    /// A store that starts usable.
    pub fn new(backend: BackendKind) -> Self {
        Self::with(backend, Condition::Up)
    }

    /// A store that starts unusable, for a reason its backend already logged.
    pub fn starting_down(backend: BackendKind, reason: &str) -> Self {
        Self::with(backend, Condition::Down(one_line(reason)))
    }

    fn with(backend: BackendKind, condition: Condition) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                state: Mutex::new(State {
                    condition,
                    observer: None,
                }),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `Ok` when the store is usable, else the one-line reason (what
    /// `/ready` answers with a 503).
    pub fn readiness(&self) -> Result<(), String> {
        match &self.state().condition {
            Condition::Up => Ok(()),
            Condition::Down(reason) | Condition::Failed(reason) => Err(reason.clone()),
        }
    }

    /// The store is usable (again). Logs when it was not.
    pub fn set_up(&self) {
        let mut state = self.state();
        match &state.condition {
            Condition::Up => {}
            // Only a restart clears a failure.
            Condition::Failed(_) => {}
            Condition::Down(_) => {
                tracing::info!(
                    backend = self.inner.backend.as_str(),
                    "storage is usable again"
                );
                state.condition = Condition::Up;
                if let Some(o) = &state.observer {
                    o.availability(true);
                }
            }
        }
    }

    /// The store is not usable for now. Logs when it was usable; while it
    /// stays down only the reason `/ready` gives is updated.
    pub fn set_down(&self, reason: &str) {
        let mut state = self.state();
        match &state.condition {
            Condition::Failed(_) => {}
            Condition::Down(_) => state.condition = Condition::Down(one_line(reason)),
            Condition::Up => {
                tracing::error!(
                    backend = self.inner.backend.as_str(),
                    reason,
                    "storage is not usable"
                );
                state.condition = Condition::Down(one_line(reason));
                if let Some(o) = &state.observer {
                    o.availability(false);
                }
            }
        }
    }

    /// The store will not be usable again until the agent restarts. Logs
    /// the first time only.
    pub fn set_failed(&self, reason: &str) {
        let mut state = self.state();
        if matches!(state.condition, Condition::Failed(_)) {
            return;
        }
        tracing::error!(
            backend = self.inner.backend.as_str(),
            reason,
            "storage failed; restart the agent once the cause is fixed"
        );
        let was_up = state.condition == Condition::Up;
        state.condition = Condition::Failed(one_line(reason));
        if let (true, Some(o)) = (was_up, &state.observer) {
            o.availability(false);
        }
    }

    /// Whether [`Health::set_failed`] was called.
    pub fn is_failed(&self) -> bool {
        matches!(self.state().condition, Condition::Failed(_))
    }

    /// Counts a caught panic (the backend logs and handles it).
    pub fn record_panic(&self) {
        if let Some(o) = &self.state().observer {
            o.panicked();
        }
    }

    /// Installs the observer and tells it the current state.
    pub fn observe(&self, observer: Arc<dyn HealthObserver>) {
        let mut state = self.state();
        observer.availability(state.condition == Condition::Up);
        state.observer = Some(observer);
    }
}

/// Reasons end up in one-line places (an HTTP body, a log field, a reply).
fn one_line(reason: &str) -> String {
    reason.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Recorded {
        ups: AtomicU64,
        downs: AtomicU64,
        panics: AtomicU64,
    }

    impl HealthObserver for Recorded {
        fn availability(&self, up: bool) {
            if up { &self.ups } else { &self.downs }.fetch_add(1, Ordering::Relaxed);
        }
        fn panicked(&self) {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn observer_sees_transitions_only_and_failure_is_final() {
        let health = Health::new(BackendKind::Local);
        let seen = Arc::new(Recorded::default());
        health.observe(seen.clone());
        assert_eq!(
            seen.ups.load(Ordering::Relaxed),
            1,
            "current state on install"
        );
        assert_eq!(health.readiness(), Ok(()));

        health.set_down("disk full");
        health.set_down("disk still\nfull");
        assert_eq!(health.readiness(), Err("disk still full".to_string()));
        assert_eq!(seen.downs.load(Ordering::Relaxed), 1);
        health.set_up();
        health.set_up();
        assert_eq!(seen.ups.load(Ordering::Relaxed), 2);

        health.set_failed("file gone");
        health.set_failed("again");
        health.set_up();
        health.set_down("later");
        assert_eq!(health.readiness(), Err("file gone".to_string()));
        assert!(health.is_failed());
        assert_eq!(seen.downs.load(Ordering::Relaxed), 2);
        assert_eq!(seen.ups.load(Ordering::Relaxed), 2);

        health.record_panic();
        assert_eq!(seen.panics.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn starting_down_reports_down_to_a_new_observer() {
        let health = Health::starting_down(BackendKind::Redis, "Redis unreachable");
        let seen = Arc::new(Recorded::default());
        health.observe(seen.clone());
        assert_eq!(seen.downs.load(Ordering::Relaxed), 1);
        assert_eq!(health.readiness(), Err("Redis unreachable".to_string()));
        health.set_up();
        assert_eq!(health.readiness(), Ok(()));
    }
}
