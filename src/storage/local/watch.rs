//! The watchdog: a thread that checks, every [`TICK`], that the database
//! path still names the open file, and probes whether writes work again
//! while they are being retried. Without it an idle agent would never
//! notice its file was deleted, nor that a full disk has room again.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc as queue;

use super::engine::{Engine, WriteRequest};
use super::error::OpenError;

/// How often the watchdog looks.
pub(super) const TICK: Duration = Duration::from_millis(250);

/// Stops the thread when dropped or closed.
pub(super) struct Watchdog {
    /// Dropping it wakes the thread and makes it exit.
    stop: Option<mpsc::Sender<()>>,
    /// Taken by `stop`, for the caller to join.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// `probes` sends to the writer's queue; the thread holds it until it stops.
    pub(super) fn start(
        engine: Arc<Engine>,
        probes: queue::Sender<WriteRequest>,
    ) -> Result<Self, OpenError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("agent-db-watchdog".into())
            .spawn(move || loop {
                match stopped.recv_timeout(TICK) {
                    Err(RecvTimeoutError::Timeout) => engine.tick(&probes),
                    _ => return,
                }
            })
            .map_err(OpenError::Watchdog)?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it, so it no longer holds the
    /// writer's queue open.
    pub(super) fn stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.stop.take();
        self.thread.take()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
    }
}
