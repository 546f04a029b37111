//! One inbound connection's handler, as mini-redis's per-connection
//! `Handler`: it owns what serving its connection needs (the framed
//! stream, its place under the cap, the shared message handler, storage
//! and budget through it, the shutdown signals), so its loop reads as the
//! steps of one request: read a frame, decode it, apply it, write the
//! reply. The listener ([`super::server`]) only admits and hands over.
//!
//! Replies are batched into one write while storage answers, and sent at
//! once after a request that storage failed, so a stalled backend never
//! holds back an error reply behind the next request's wait.
//!
//! Memory beyond the connection's fixed buffers comes from the shared
//! [`Budget`]: for a long line (reserved by the connection as it reads, and
//! kept while what was decoded from the line is in use), and for a reply
//! that may be long (a get: reserved for the longest possible reply before
//! it runs, then cut to the actual size until the peer has taken it). Both
//! buffers shrink back afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::budget::{Budget, Reservation};
use super::connection::{self, Connection, Frame, PeerStream, FIXED_BUFFER};
use super::handler::{Decoded, Handler};
use super::peers::{PeerGuard, Peers};
use super::protocol;
use crate::net::{SocketPermit, Ticket};
use crate::storage::Storage;

/// The target of the listener's and its connections' log lines: the
/// module's path before the peer side became a folder, kept so that
/// operators' filters still match (`log.level: info,agent::server=debug`
/// shows each connection). Here rather than in `server.rs`, which imports
/// this file, so that the import runs one way.
pub(super) const LOG_TARGET: &str = "agent::server";

/// How long a closing connection may take to deliver its last replies.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How long input is drained after a too-large message before closing.
const TOO_LARGE_DRAIN: Duration = Duration::from_secs(1);
/// A reply's bytes besides its value: the id (at most
/// `protocol::MAX_ID_BYTES`) and the reply's own fields, with room to spare.
const REPLY_OVERHEAD: usize = 1024;
/// How long an idle connection may take to deliver what it still holds
/// before it is reset (its peer has not been reading).
const IDLE_CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// What every connection of the listener shares; each connection's task
/// gets its own clone, so no task borrows from the accept loop.
pub(super) struct Shared<S> {
    /// Answers every request.
    pub(super) handler: Arc<Handler<S>>,
    /// Counts the connections, and why they close.
    pub(super) peers: Peers,
    /// `network.max_buffered_bytes`, for long lines and long replies.
    pub(super) budget: Arc<Budget>,
    /// `network.max_message_bytes`: the longest request line.
    pub(super) max_line: usize,
    /// `network.idle_timeout`.
    pub(super) idle_timeout: Duration,
    /// Stop reading; answer what was read (the start of a shutdown).
    pub(super) cancel: CancellationToken,
    /// The drain time is up: what still waits on storage is answered
    /// `shutting down`.
    pub(super) deadline: CancellationToken,
}

// By hand: a derive would ask `S: Clone`, and storage is shared through
// the handler's `Arc`, never cloned.
impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
            peers: self.peers.clone(),
            budget: Arc::clone(&self.budget),
            max_line: self.max_line,
            idle_timeout: self.idle_timeout,
            cancel: self.cancel.clone(),
            deadline: self.deadline.clone(),
        }
    }
}

impl<S> Shared<S> {
    /// Frames `stream` with this listener's line limit, idle timeout and
    /// budget.
    pub(super) fn frame<T: PeerStream>(&self, conn: Connection<T>) -> Connection<T> {
        conn.with_idle_timeout(self.idle_timeout)
            .with_budget(Arc::clone(&self.budget))
    }
}

/// How a connection ends, which decides how it is closed.
enum End {
    /// Shutdown: stop reading, deliver the replies due, then close.
    Drain,
    /// No request completed within `network.idle_timeout`: give the place
    /// up, and reset if the peer is not taking its replies.
    Idle,
    /// Closed by the peer, failed, evicted, or already closed after a
    /// too-large line: nothing is owed.
    Now,
}

impl End {
    /// How a connection ends after a failed read or write.
    fn after(e: std::io::Error) -> Self {
        if connection::is_idle_timeout(&e) {
            End::Idle
        } else {
            End::Now
        }
    }
}

/// One connection's handler. The fields are dropped in their order: the
/// socket is closed first, then its place under the cap is given back,
/// then the close is logged and the connection uncounted, and last its
/// socket's share of the listener's budget is returned.
pub(super) struct Conversation<S, T> {
    /// The peer's stream, framed into lines.
    conn: Connection<T>,
    /// Its place under `network.max_connections`; says when a newcomer
    /// evicts it, and is marked served at its first request.
    ticket: Ticket,
    /// Its open and close lines in the debug log.
    log: ConnLog,
    /// Counts it in `agent_peers_connected` while it is open.
    _connected: PeerGuard,
    /// Its socket's share of the listener's socket budget.
    _socket: SocketPermit,
    /// The handler, the counters, the budget and the shutdown signals.
    shared: Shared<S>,
    /// The longest reply beyond the fixed write buffer: a value as long as
    /// the longest request, plus the id and the reply's own fields.
    longest_reply: usize,
    /// The replies being made; kept between requests so that a short
    /// reply costs no allocation.
    out: Vec<u8>,
}

impl<S: Storage, T: PeerStream> Conversation<S, T> {
    /// Takes over an admitted connection; `tls` is for the log.
    pub(super) fn open(
        conn: Connection<T>,
        remote: SocketAddr,
        tls: bool,
        ticket: Ticket,
        socket: SocketPermit,
        shared: Shared<S>,
    ) -> Self {
        let connected = shared.peers.connected();
        Self {
            longest_reply: (conn.max_line() + REPLY_OVERHEAD).saturating_sub(FIXED_BUFFER),
            conn,
            ticket,
            log: ConnLog::open(remote, tls),
            _connected: connected,
            _socket: socket,
            shared,
            out: Vec::with_capacity(256),
        }
    }

    /// Serves the connection, one reply per request line in order, until
    /// it ends; then closes it as its end asks.
    pub(super) async fn run(mut self) {
        let end = loop {
            // At shutdown, requests already received are answered; nothing
            // more is read.
            let stopping = self.shared.cancel.is_cancelled();
            if stopping && !self.conn.has_buffered_line() {
                break End::Drain;
            }
            if let Err(end) = self.serve_one(stopping).await {
                break end;
            }
        };
        match end {
            End::Drain => self.drain().await,
            End::Idle => self.close_idle().await,
            End::Now => {}
        }
    }

    /// One request, step by step.
    async fn serve_one(&mut self, stopping: bool) -> Result<(), End> {
        if !self.read_frame().await? {
            return Ok(());
        }
        let (request, hold) = self.decode().await?;
        let storage_failed = self.apply(request, stopping).await;
        self.write_reply(storage_failed, hold).await
    }

    /// Reads the next request line; false for a blank line, which is not a
    /// request and owes no reply.
    async fn read_frame(&mut self) -> Result<bool, End> {
        let frame = tokio::select! {
            biased;
            frame = self.conn.read_line() => frame,
            _ = self.shared.cancel.cancelled() => return Err(End::Drain),
            // Counted at admission; it never completed a request, so no
            // reply is owed.
            _ = self.ticket.evicted() => return Err(End::Now),
        };
        self.out.clear();
        match frame.map_err(End::after)? {
            Frame::Line => {}
            Frame::Closed => return Err(End::Now),
            Frame::TooLarge => {
                self.too_large().await;
                return Err(End::Now);
            }
        }
        if protocol::is_blank(self.conn.line()) {
            // Not a request; a long one gives its memory back all the same.
            drop(self.conn.release_line());
            return Ok(false);
        }
        self.ticket.served();
        self.log.messages += 1;
        self.conn.restart_idle_timer();
        Ok(true)
    }

    /// Decodes the line, and holds the memory its reply may need: the
    /// line's own reservation, or, for a reply that may be long, one for
    /// the longest reply.
    async fn decode(&mut self) -> Result<(Decoded, Option<Reservation>), End> {
        let request = self.shared.handler.decode(self.conn.line());
        let mut hold = self.conn.release_line();
        if request.reply_may_be_large() && self.longest_reply > 0 {
            // One reservation at a time: the line's goes back first.
            drop(hold);
            hold = Some(self.reserve_reply().await.map_err(End::after)?);
        }
        Ok((request, hold))
    }

    /// Runs the request against storage and appends its reply; returns
    /// whether storage failed it.
    async fn apply(&mut self, request: Decoded, stopping: bool) -> bool {
        let handler = &self.shared.handler;
        // During a shutdown, a request that may wait on storage is cut
        // short by the drain deadline. Before it, every request is bounded
        // by its backend (storage.redis.timeout); racing each one against
        // the deadline cost measurably more instructions per Redis message
        // (docs/performance-history.md, "Replies under a failing backend").
        if stopping && handler.may_wait(&request) {
            handler
                .execute_until(request, &mut self.out, &self.shared.deadline)
                .await
        } else {
            handler.execute(request, &mut self.out).await
        }
    }

    /// Hands the reply to the connection, sending it at once when storage
    /// failed; then gives back the memory it held.
    async fn write_reply(
        &mut self,
        storage_failed: bool,
        mut hold: Option<Reservation>,
    ) -> Result<(), End> {
        if let Some(hold) = &mut hold {
            hold.shrink_to(self.out.capacity().saturating_sub(FIXED_BUFFER));
        }
        let mut written = self.conn.write(&self.out).await;
        if storage_failed && written.is_ok() {
            // Storage failed this request (timed out, unreachable, refused):
            // the next one may wait as long again, so the replies made so
            // far go out now rather than behind it. While storage answers,
            // replies share writes: sending them before every request that
            // waits on storage cost a tenth and more of the throughput of
            // pipelined local puts (docs/performance-history.md, "Replies
            // under a failing backend").
            written = self.conn.flush().await;
        }
        written.map_err(End::after)?;
        // The reply is with the kernel, or in the fixed write buffer: its
        // memory goes back, and the budget with it.
        if self.out.capacity() > FIXED_BUFFER {
            self.out = Vec::with_capacity(256);
        }
        drop(hold);
        Ok(())
    }

    /// Answers a line longer than the limit, and closes: the stream cannot
    /// be resynchronised.
    async fn too_large(&mut self) {
        self.log.messages += 1;
        self.shared
            .handler
            .too_large(self.conn.max_line(), &mut self.out);
        let _ = self.conn.write(&self.out).await;
        let _ = tokio::time::timeout(FINAL_FLUSH, self.conn.shutdown()).await;
        self.conn.discard_input(TOO_LARGE_DRAIN).await;
    }

    /// Reserves the longest reply. If it is not free now, the replies
    /// already due are sent first, then it waits; the peer's idle time
    /// starts over afterwards, as the wait was the agent's.
    async fn reserve_reply(&mut self) -> std::io::Result<Reservation> {
        let bytes = self.longest_reply;
        if let Some(hold) = self.shared.budget.try_reserve(bytes) {
            return Ok(hold);
        }
        self.conn.flush().await?;
        let hold = self
            .conn
            .reserve_unless_failed(&self.shared.budget, bytes)
            .await?;
        self.conn.restart_idle_timer();
        Ok(hold)
    }

    /// Delivers what is due within [`FINAL_FLUSH`], at shutdown.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
        let _ = tokio::time::timeout_at(deadline, self.conn.shutdown()).await;
        // The peer may still be sending; closing now would reset the
        // connection and drop replies it has not received yet.
        self.conn.wait_delivered(deadline).await;
    }

    /// Closes a connection whose peer completed no request within
    /// `network.idle_timeout`, and counts it unless a newcomer evicted it
    /// first.
    async fn close_idle(&mut self) {
        // Give the place up before the flush below, so that no newcomer
        // evicts a connection already on its way out.
        if self.ticket.leave() {
            self.shared.peers.idle_closed();
        }
        tracing::debug!(
            target: LOG_TARGET,
            "closing a peer connection idle for network.idle_timeout"
        );
        let deadline = tokio::time::Instant::now() + IDLE_CLOSE_FLUSH;
        let flushed = tokio::time::timeout_at(deadline, self.conn.shutdown()).await;
        self.conn.wait_delivered(deadline).await;
        if !matches!(flushed, Ok(Ok(()))) || !self.conn.delivered() {
            // The peer is not taking its replies. A plain close would leave
            // the kernel holding them (megabytes, for minutes) and the peer
            // reading EOF only once it had read them all; a reset frees them
            // now, and the peer's next read fails.
            self.conn.reset_on_close();
        }
    }
}

/// An inbound connection's life in the debug log: one line when it opens,
/// one when it closes (however it ends), with its duration and messages.
struct ConnLog {
    /// The peer's address, to tie the two lines together.
    remote: SocketAddr,
    /// For the duration in the closing line.
    opened: std::time::Instant,
    /// Complete requests read, including one too large.
    messages: u64,
}

impl ConnLog {
    fn open(remote: SocketAddr, tls: bool) -> Self {
        tracing::debug!(target: LOG_TARGET, %remote, tls, "peer connection open");
        Self {
            remote,
            opened: std::time::Instant::now(),
            messages: 0,
        }
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        tracing::debug!(
            target: LOG_TARGET,
            remote = %self.remote,
            duration = ?self.opened.elapsed(),
            messages = self.messages,
            "peer connection closed"
        );
    }
}
