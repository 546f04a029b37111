//! A bounded queue served by dedicated threads, each taking what has queued
//! up as one batch.
//!
//! A panic while serving a batch is caught: the thread stays alive, the
//! batch's callers get an error instead of waiting forever, and `on_panic`
//! decides what the store does next. A thread that died instead would leave
//! its queue unserved and every later request failing while the process
//! looked healthy.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use super::super::StorageError;
use super::error::OpenError;

/// Requests queued beyond this make callers wait: back-pressure, not memory growth.
const QUEUE: usize = 4096;
/// Most requests taken as one batch.
const MAX_BATCH: usize = 1024;

/// Where a queued request's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

/// Closing lets the threads drain the queue and exit. `serve` must not take
/// a request out of the batch before the work that may panic is done:
/// a request dropped while unwinding would fail its caller before
/// `on_panic` has run.
pub(super) struct BatchQueue<R> {
    /// `None` once closed: new requests are refused.
    tx: Mutex<Option<mpsc::Sender<R>>>,
    /// Joined at close.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl<R: Send + 'static> BatchQueue<R> {
    /// Starts `threads` threads named `name-<n>` running `serve` on each
    /// batch; `on_panic(thread name, panic message)` runs after a caught panic.
    pub(super) fn start(
        name: &'static str,
        threads: usize,
        serve: impl Fn(&mut Vec<R>) + Send + Sync + 'static,
        on_panic: impl Fn(&str, &str) + Send + Sync + 'static,
    ) -> Result<Self, OpenError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let serve = Arc::new(serve);
        let on_panic = Arc::new(on_panic);
        let mut handles = Vec::with_capacity(threads);
        for n in 0..threads {
            let (rx, serve, on_panic) =
                (Arc::clone(&rx), Arc::clone(&serve), Arc::clone(&on_panic));
            let thread_name = format!("{name}-{n}");
            let handle = std::thread::Builder::new()
                .name(thread_name.clone())
                .spawn(move || {
                    let mut batch = Vec::with_capacity(MAX_BATCH);
                    while next_batch(&rx, &mut batch) {
                        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| serve(&mut batch))) {
                            // First, so that callers learn of the panic only
                            // once the store has acted on it.
                            on_panic(&thread_name, &panic_message(payload.as_ref()));
                            // Dropping the unanswered requests closes their
                            // reply channels: `call` turns that into an error.
                            batch.clear();
                        }
                        batch.clear();
                    }
                })
                .map_err(|source| OpenError::Thread { name, source })?;
            handles.push(handle);
        }
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        })
    }

    /// A sender for requests the store makes itself (the watchdog's write
    /// probes); `None` once closed. Holders must drop it before `close`
    /// can finish, since the threads exit only when every sender is gone.
    pub(super) fn sender(&self) -> Option<mpsc::Sender<R>> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues the request built around a reply channel and waits for its answer.
    pub(super) async fn call<T>(
        &self,
        request: impl FnOnce(Reply<T>) -> R,
    ) -> Result<T, StorageError> {
        let stopped = || StorageError::Closed;
        let tx = self.sender().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        tx.send(request(reply)).await.map_err(|_| stopped())?;
        // The threads answer every request they take, unless serving its
        // batch panicked.
        answer.await.map_err(|_| StorageError::Panicked)?
    }

    /// Stops taking requests, lets the threads answer what is queued, and
    /// waits for them to exit.
    pub(super) async fn close(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let _ = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        })
        .await;
    }
}

/// Waits for a request, then takes whatever else is queued. False once the
/// queue is closed and empty.
fn next_batch<R>(rx: &Mutex<mpsc::Receiver<R>>, batch: &mut Vec<R>) -> bool {
    let mut rx = rx.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(first) = rx.blocking_recv() else {
        return false;
    };
    batch.push(first);
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(req) => batch.push(req),
            Err(_) => break,
        }
    }
    true
}

/// The text a panic was raised with (`panic!`'s message), for the log.
pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Req {
        n: u64,
        reply: Reply<u64>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_batch_fails_its_callers_and_the_thread_serves_on() {
        let panics = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&panics);
        let queue = BatchQueue::start(
            "test-queue",
            1,
            |batch: &mut Vec<Req>| {
                let answers: Vec<u64> = batch
                    .iter()
                    .map(|req| {
                        assert_ne!(req.n, 13, "unlucky");
                        req.n * 2
                    })
                    .collect();
                for (req, answer) in batch.drain(..).zip(answers) {
                    let _ = req.reply.send(Ok(answer));
                }
            },
            move |thread, message| {
                assert_eq!(thread, "test-queue-0");
                assert!(message.contains("unlucky"), "{message}");
                seen.fetch_add(1, Ordering::Relaxed);
            },
        )
        .unwrap();
        let err = queue.call(|reply| Req { n: 13, reply }).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(panics.load(Ordering::Relaxed), 1, "on_panic ran first");
        assert_eq!(queue.call(|reply| Req { n: 4, reply }).await.unwrap(), 8);
        queue.close().await;
        assert!(queue.call(|reply| Req { n: 1, reply }).await.is_err());
    }
}
