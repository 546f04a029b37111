//! Turns one request line into one reply line: decode, execute against
//! storage, encode. No sockets here, so benchmarks drive exactly the code
//! that serves peers.

use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::protocol::{self, EchoId, FailReason, Failure, Outcome, Request};
use crate::config::BackendKind;
use crate::net::preview;
use crate::storage::Storage;
use crate::telemetry::Throttle;
use crate::telemetry::{MessageMetrics, Start};

/// The target of these log lines: the module's path before the move into
/// a folder, kept so that operators' `log.level` filters still match.
const LOG_TARGET: &str = "agent::handler";

/// At most one summary of failed messages per this period.
const FAILURE_SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// A request line decoded into owned parts, counted as received: the
/// line's buffer can be released before the request runs.
pub struct Decoded {
    start: Start,
    id: Option<EchoId>,
    request: Result<Request, Failure>,
}

impl Decoded {
    /// Whether the reply can be large. Only a `get` returns data of any
    /// size; every other reply is at most about a kilobyte (bounded id,
    /// bounded error texts).
    pub fn reply_may_be_large(&self) -> bool {
        matches!(self.request, Ok(Request::Get { .. }))
    }
}

/// Whether the outcome is a storage failure (a timeout, an unreachable or
/// refusing backend, or a request cut short at shutdown).
fn storage_failed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed(f) if f.reason == FailReason::Storage)
}

/// The reply to a request whose storage operation had not started when the
/// drain time of a shutdown was up.
const NOT_RUN: &str = "shutting down: the request was not run";
/// The reply to a request still waiting on storage when the drain time of a
/// shutdown was up; the backend may still apply it.
const CUT_SHORT: &str =
    "shutting down: storage did not answer in time; the request may or may not have been applied";

/// Message handling shared by every connection.
pub struct Handler<S> {
    storage: S,
    metrics: MessageMetrics,
    failures: FailureSummary,
}

/// Failed messages, summarised in the log: the first at once, then at
/// most one line per [`FAILURE_SUMMARY_PERIOD`] with the count by reason
/// since the last line, and one example error (an escaped preview: it can
/// quote what the peer sent). Misbehaving peers cannot flood the log, and
/// the `HighMessageErrorRate` runbook has lines to read.
struct FailureSummary {
    state: Mutex<(Throttle, [u64; FailReason::ALL.len()])>,
}

impl FailureSummary {
    fn new() -> Self {
        Self {
            state: Mutex::new((
                Throttle::new(FAILURE_SUMMARY_PERIOD),
                [0; FailReason::ALL.len()],
            )),
        }
    }

    fn record(&self, failure: &Failure) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1[failure.reason as usize] += 1;
        if state.0.allow().is_some() {
            let n = std::mem::take(&mut state.1);
            tracing::warn!(target: LOG_TARGET,
                parse = n[FailReason::Parse as usize],
                invalid = n[FailReason::Invalid as usize],
                unknown_op = n[FailReason::UnknownOp as usize],
                too_large = n[FailReason::TooLarge as usize],
                storage = n[FailReason::Storage as usize],
                example = %preview(failure.message.as_bytes()),
                "messages answered with an error since the last summary"
            );
        }
    }
}

impl<S: Storage> Handler<S> {
    /// Creates the message metric handles against the recorder installed now.
    pub fn new(storage: S) -> Self {
        Self {
            storage,
            metrics: MessageMetrics::new(),
            failures: FailureSummary::new(),
        }
    }

    /// The store behind the handler, for health checks and closing it at shutdown.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Handles one complete line and appends its reply to `out`:
    /// [`Handler::decode`] then [`Handler::execute`], as the server does.
    pub async fn handle(&self, line: &[u8], out: &mut Vec<u8>) {
        let decoded = self.decode(line);
        let _failed = self.execute(decoded, out).await;
    }

    /// Counts one received message and decodes it; its processing time
    /// runs from here to the end of [`Handler::execute`].
    pub fn decode(&self, line: &[u8]) -> Decoded {
        let start = self.metrics.duration.start();
        self.metrics.received.increment(1);
        let (id, request) = protocol::decode(line);
        Decoded {
            start,
            // decode never returns an id longer than an EchoId holds.
            id: id.and_then(EchoId::new),
            request,
        }
    }

    /// Runs a decoded request and appends its reply to `out`. Returns
    /// whether storage failed it.
    pub async fn execute(&self, decoded: Decoded, out: &mut Vec<u8>) -> bool {
        let outcome = match decoded.request {
            Ok(request) => self.run(request).await,
            Err(failure) => Outcome::Failed(failure),
        };
        self.reply(decoded.start, decoded.id.as_ref(), &outcome, out);
        storage_failed(&outcome)
    }

    /// Whether running `decoded` can keep its connection waiting long: a
    /// round trip to Redis, or the durable commit of a local put or delete.
    /// During a shutdown the server runs such a request with
    /// [`Handler::execute_until`]. A local get is answered from memory in
    /// microseconds.
    pub fn may_wait(&self, decoded: &Decoded) -> bool {
        match decoded.request {
            Ok(Request::Get { .. }) => self.storage.backend() != BackendKind::Local,
            Ok(Request::Put { .. } | Request::Delete { .. }) => true,
            Ok(Request::Ping) | Err(_) => false,
        }
    }

    /// As [`Handler::execute`], but once `deadline` is cancelled (the drain
    /// time of a shutdown is up) the request is answered `shutting down`
    /// instead of waiting on storage any longer. The reason counted is
    /// `storage`: the backend did not answer in time. Returns whether
    /// storage failed the request (or it was cut short).
    pub async fn execute_until(
        &self,
        decoded: Decoded,
        out: &mut Vec<u8>,
        deadline: &CancellationToken,
    ) -> bool {
        let shutting_down = |text| Outcome::Failed(Failure::new(FailReason::Storage, text));
        let outcome = match decoded.request {
            Ok(_) if deadline.is_cancelled() => shutting_down(NOT_RUN),
            Ok(request) => tokio::select! {
                biased;
                () = deadline.cancelled() => shutting_down(CUT_SHORT),
                outcome = self.run(request) => outcome,
            },
            Err(failure) => Outcome::Failed(failure),
        };
        self.reply(decoded.start, decoded.id.as_ref(), &outcome, out);
        storage_failed(&outcome)
    }

    /// Appends the reply for a line longer than the limit, which is counted
    /// like any other failed message.
    pub fn too_large(&self, limit: usize, out: &mut Vec<u8>) {
        let start = self.metrics.duration.start();
        self.metrics.received.increment(1);
        let failure = Failure::new(
            FailReason::TooLarge,
            format!(
                "message exceeds network.max_message_bytes ({limit} bytes); closing connection"
            ),
        );
        self.reply(start, None, &Outcome::Failed(failure), out);
    }

    /// Counts a failure, encodes the reply and records the message's duration.
    fn reply(&self, start: Start, id: Option<&EchoId>, outcome: &Outcome, out: &mut Vec<u8>) {
        if let Outcome::Failed(f) = outcome {
            self.metrics.failed(f.reason).increment(1);
            self.failures.record(f);
        }
        protocol::encode(out, id.map(EchoId::as_bytes), outcome);
        self.metrics.duration.record_since(start);
    }

    async fn run(&self, request: Request) -> Outcome {
        let result = match request {
            Request::Ping => return Outcome::Ok,
            Request::Get { key } => self.storage.get(&key).await.map(Outcome::Value),
            Request::Put { key, value } => {
                self.storage.put(&key, &value).await.map(|()| Outcome::Ok)
            }
            Request::Delete { key } => self.storage.delete(&key).await.map(Outcome::Deleted),
        };
        result.unwrap_or_else(|e| Outcome::Failed(Failure::new(FailReason::Storage, e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CACHE_SIZE;
    use crate::storage::{Instrumented, LocalStore};
    use crate::telemetry::defs::{
        MESSAGES_FAILED_TOTAL, MESSAGES_RECEIVED_TOTAL, MESSAGE_PROCESSING_DURATION_SECONDS,
        STORAGE_OPERATIONS_TOTAL,
    };
    use crate::test_support::{counter, histogram_count};
    use metrics_util::debugging::DebuggingRecorder;

    #[tokio::test]
    async fn records_every_message_and_failure_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("db"), DEFAULT_CACHE_SIZE)
            .await
            .unwrap();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let handler =
            metrics::with_local_recorder(&recorder, || Handler::new(Instrumented::new(store)));

        let lines: &[&[u8]] = &[
            br#"{"id":1,"op":"put","key":"a","value":"1"}"#,
            br#"{"id":2,"op":"get","key":"a"}"#,
            br#"{"id":3,"op":"delete","key":"a"}"#,
            br#"{"op":"ping"}"#,
            b"garbage",
            b"[]",
            br#"{"op":"nope"}"#,
        ];
        let mut out = Vec::new();
        for line in lines {
            handler.handle(line, &mut out).await;
        }
        handler.too_large(10, &mut out);
        let replies = String::from_utf8(out).unwrap();
        let replies: Vec<&str> = replies.lines().collect();
        assert_eq!(replies[0], r#"{"id":1,"ok":true}"#);
        assert_eq!(replies[1], r#"{"id":2,"ok":true,"value":"1"}"#);
        assert_eq!(replies[2], r#"{"id":3,"ok":true,"deleted":true}"#);
        assert_eq!(replies.len(), 8);

        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(counter(&snap, MESSAGES_RECEIVED_TOTAL, &[]), 8);
        assert_eq!(
            histogram_count(&snap, MESSAGE_PROCESSING_DURATION_SECONDS, &[]),
            8
        );
        for (reason, n) in [
            ("parse", 1),
            ("invalid", 1),
            ("unknown_op", 1),
            ("too_large", 1),
            ("storage", 0),
        ] {
            assert_eq!(
                counter(&snap, MESSAGES_FAILED_TOTAL, &[("reason", reason)]),
                n,
                "{reason}"
            );
        }
        for op in ["get", "put", "delete"] {
            assert_eq!(
                counter(
                    &snap,
                    STORAGE_OPERATIONS_TOTAL,
                    &[("operation", op), ("backend", "local")]
                ),
                1,
                "{op}"
            );
        }
        handler.storage().close().await;
    }
}
