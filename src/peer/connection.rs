//! Line framing over one peer stream (TCP today; any byte stream, such as
//! TLS over TCP, through [`PeerStream`]).
//!
//! Reads and writes are buffered with fixed capacities, and replies are
//! flushed only when no complete request is left to read. A peer that
//! pipelines without reading its replies fills the socket, our writes then
//! wait, and we stop reading: back-pressure instead of unbounded buffers.
//!
//! A line longer than [`FIXED_BUFFER`] is held in memory reserved from the
//! shared [`Budget`] (waiting for it if need be, without reading further),
//! and the buffer shrinks back once the line has been decoded: memory per
//! connection does not grow with the largest line ever seen.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::budget::{Budget, Reservation};

/// Each connection's fixed allowance, per buffer: the read buffer, the
/// write buffer, and what a line or a reply may take before it needs the
/// shared [`Budget`].
pub(crate) const FIXED_BUFFER: usize = 64 * 1024;
const READ_BUFFER: usize = FIXED_BUFFER;
const WRITE_BUFFER: usize = FIXED_BUFFER;

/// What [`Connection::read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete line, without its `\n` (and `\r`), in [`Connection::line`].
    Line,
    /// The peer closed the connection (any partial line is dropped).
    Closed,
    /// The line grew past the limit; the connection cannot be resynchronised.
    TooLarge,
}

/// A byte stream a peer connection runs over.
pub(crate) trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Bytes written that the peer has not acknowledged yet (0 when the
    /// transport cannot tell). A TLS stream answers for its TCP socket.
    fn unacknowledged(&self) -> usize {
        0
    }

    /// Resolves once the transport reports an error, such as a reset from
    /// the peer: nothing more can be delivered. Never, when the transport
    /// cannot tell. A TLS stream answers for its TCP socket.
    fn failed(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::pending()
    }

    /// Makes the close that follows a reset (`SO_LINGER` 0): the kernel
    /// drops what the peer has not taken instead of holding it for a peer
    /// that does not read. Nothing, when the transport cannot.
    fn reset_on_close(&self) {}
}

impl PeerStream for TcpStream {
    fn unacknowledged(&self) -> usize {
        unacknowledged_bytes(self)
    }

    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }

    async fn failed(&self) {
        match self.ready(tokio::io::Interest::ERROR).await {
            Ok(ready) if !ready.is_error() => std::future::pending().await,
            _ => {}
        }
    }
}

impl PeerStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn unacknowledged(&self) -> usize {
        self.get_ref().0.unacknowledged()
    }

    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close()
    }

    fn failed(&self) -> impl Future<Output = ()> + Send + '_ {
        self.get_ref().0.failed()
    }
}

impl PeerStream for tokio_rustls::client::TlsStream<TcpStream> {
    fn unacknowledged(&self) -> usize {
        self.get_ref().0.unacknowledged()
    }

    fn failed(&self) -> impl Future<Output = ()> + Send + '_ {
        self.get_ref().0.failed()
    }
}

/// Sets TCP_NODELAY on a socket that will carry TLS: replies are flushed
/// when due and must not wait for an acknowledgement.
pub(crate) fn prepare(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// What a wait for memory from the budget fails with when the peer reset
/// the connection meanwhile: the request cannot be answered any more.
fn reset_while_waiting() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "peer reset the connection while waiting for memory",
    )
}

/// What a read or write fails with when the peer sent no complete request
/// for the idle timeout: whether it is silent or has stopped reading its
/// replies, it holds a connection slot and buffers for nothing.
#[derive(Debug, thiserror::Error)]
#[error("no complete request within network.idle_timeout")]
pub(crate) struct IdleTimeout;

/// Whether `e` is an [`IdleTimeout`] (and not an I/O error of the socket).
pub(crate) fn is_idle_timeout(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<IdleTimeout>())
}

/// The idle timeout is checked in this many ticks: a connection closes
/// between one and 1.25 idle timeouts after its last complete request.
const IDLE_TICKS: u32 = 4;

/// Tells when a peer has completed no request for the idle timeout, without
/// reading the clock per request: completing one only bumps a counter, and a
/// timer that ticks every quarter of the timeout checks it. After
/// [`IDLE_TICKS`] ticks in a row without a request, waits on the peer fail
/// with [`IdleTimeout`]. (The message path reads no clock when metrics are
/// off: docs/performance.md, "Targets".)
struct IdleTimer {
    tick: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Requests completed so far, and as of the last tick.
    requests: u64,
    seen: u64,
    /// Ticks in a row without a request.
    quiet: u32,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        let tick = timeout / IDLE_TICKS;
        Self {
            tick,
            sleep: Box::pin(tokio::time::sleep(tick)),
            requests: 0,
            seen: 0,
            quiet: 0,
        }
    }

    /// Awaits `io`, giving up with [`IdleTimeout`] once the peer has been
    /// idle too long. Ready I/O returns without touching the timer.
    async fn bound<T>(
        timer: Option<&mut Self>,
        io: impl Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        let Some(timer) = timer else {
            return io.await;
        };
        tokio::pin!(io);
        loop {
            tokio::select! {
                biased;
                done = &mut io => return done,
                () = timer.sleep.as_mut() => {
                    if timer.requests == timer.seen {
                        timer.quiet += 1;
                        if timer.quiet >= IDLE_TICKS {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                IdleTimeout,
                            ));
                        }
                    } else {
                        timer.seen = timer.requests;
                        timer.quiet = 0;
                    }
                    // From now, not from the last deadline: ticks missed
                    // while the connection was busy are not made up at once.
                    let next = Instant::now() + timer.tick;
                    timer.sleep.as_mut().reset(next);
                }
            }
        }
    }
}

/// One peer connection: requests in as lines, replies out, both buffered.
pub(crate) struct Connection<S> {
    /// Reads are buffered here; writes pass through to the write buffer
    /// (one object, as reads and writes never run concurrently).
    io: BufReader<BufWriter<S>>,
    /// The line being read, or the last one read.
    line: Vec<u8>,
    /// `line` holds a complete line that was returned: the next read starts
    /// a new one. Until then, a partial line survives a cancelled read.
    line_complete: bool,
    max_line: usize,
    /// Bounds every wait on the peer (reading, flushing, writing) when the
    /// peer must complete requests (inbound connections; outbound ones have
    /// their ping deadline instead).
    idle: Option<IdleTimer>,
    /// Where `line` beyond [`FIXED_BUFFER`] is reserved (inbound
    /// connections); None: lines are short enough not to need it.
    budget: Option<Arc<Budget>>,
    /// Covers `line` beyond [`FIXED_BUFFER`] while a long line is read.
    line_hold: Option<Reservation>,
}

impl Connection<TcpStream> {
    /// A TCP connection, with Nagle's algorithm off: replies are flushed
    /// when due and must not wait for an acknowledgement.
    pub(crate) fn tcp(stream: TcpStream, max_line: usize) -> Self {
        let _ = stream.set_nodelay(true);
        Self::new(stream, max_line)
    }
}

impl<S: PeerStream> Connection<S> {
    /// Wraps `stream`; a request line longer than `max_line` bytes fails as too large.
    pub(crate) fn new(stream: S, max_line: usize) -> Self {
        Self {
            io: BufReader::with_capacity(
                READ_BUFFER,
                BufWriter::with_capacity(WRITE_BUFFER, stream),
            ),
            line: Vec::new(),
            line_complete: false,
            max_line,
            idle: None,
            budget: None,
            line_hold: None,
        }
    }

    /// Reserves a line's memory beyond [`FIXED_BUFFER`] from `budget`.
    pub(crate) fn with_budget(mut self, budget: Arc<Budget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Closes the connection (reads and writes fail with [`IdleTimeout`])
    /// when no request completes for `timeout` (up to a quarter more); the
    /// clock starts now.
    pub(crate) fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle = Some(IdleTimer::new(timeout));
        self
    }

    /// A request completed (or the agent itself made the peer wait): the
    /// idle clock starts over.
    pub(crate) fn restart_idle_timer(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.requests = idle.requests.wrapping_add(1);
        }
    }

    /// The longest line accepted.
    pub(crate) fn max_line(&self) -> usize {
        self.max_line
    }

    /// The last line read.
    pub(crate) fn line(&self) -> &[u8] {
        &self.line
    }

    /// Reads the next line. Cancel-safe: bytes already taken from the
    /// socket stay in `self.line`, and the next call carries on with them.
    pub(crate) async fn read_line(&mut self) -> std::io::Result<Frame> {
        if self.line_complete {
            self.line.clear();
            self.line_complete = false;
        }
        loop {
            if !self.has_buffered_line() {
                // We are about to wait for the peer: it must have every reply first.
                IdleTimer::bound(self.idle.as_mut(), self.io.flush()).await?;
            }
            let buf = IdleTimer::bound(self.idle.as_mut(), self.io.fill_buf()).await?;
            if buf.is_empty() {
                return Ok(Frame::Closed);
            }
            let newline = memchr::memchr(b'\n', buf);
            let take = newline.unwrap_or(buf.len());
            let needed = self.line.len() + take;
            if needed > self.max_line {
                return Ok(Frame::TooLarge);
            }
            if needed > FIXED_BUFFER && self.line_hold.is_none() {
                if let Some(budget) = self.budget.clone() {
                    // The bytes stay buffered; they are taken once the
                    // line's memory is reserved.
                    self.reserve_line(&budget).await?;
                    continue;
                }
            }
            self.grow_line(take);
            let buf = self.io.buffer();
            self.line.extend_from_slice(&buf[..take]);
            match newline {
                Some(_) => {
                    self.io.consume(take + 1);
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    self.line_complete = true;
                    return Ok(Frame::Line);
                }
                None => self.io.consume(take),
            }
        }
    }

    /// Reserves what the longest line could need beyond [`FIXED_BUFFER`],
    /// in one go (so that no connection holds part of the budget while it
    /// waits for more). Replies already due are flushed before waiting, and
    /// the wait does not count as the peer's idle time.
    async fn reserve_line(&mut self, budget: &Budget) -> std::io::Result<()> {
        let bytes = self.max_line.saturating_sub(FIXED_BUFFER);
        let hold = match budget.try_reserve(bytes) {
            Some(hold) => hold,
            None => {
                IdleTimer::bound(self.idle.as_mut(), self.io.flush()).await?;
                let hold = self.reserve_unless_failed(budget, bytes).await?;
                self.restart_idle_timer();
                hold
            }
        };
        self.line_hold = Some(hold);
        Ok(())
    }

    /// Waits for `bytes` from `budget`, unless the peer resets the
    /// connection first: a connection whose peer is gone must not wait its
    /// turn (and then work) for nothing.
    pub(crate) async fn reserve_unless_failed(
        &self,
        budget: &Budget,
        bytes: usize,
    ) -> std::io::Result<Reservation> {
        tokio::select! {
            hold = budget.reserve(bytes) => Ok(hold),
            _ = self.io.get_ref().get_ref().failed() => Err(reset_while_waiting()),
        }
    }

    /// Makes room for `extra` more bytes of line, growing geometrically but
    /// never past [`FIXED_BUFFER`] without a reservation, nor past the
    /// longest line: what a reservation covers is what is allocated.
    fn grow_line(&mut self, extra: usize) {
        let needed = self.line.len() + extra;
        if needed <= self.line.capacity() {
            return;
        }
        let limit = if needed <= FIXED_BUFFER {
            FIXED_BUFFER
        } else {
            self.max_line
        };
        let target = (self.line.capacity() * 2).max(256).min(limit).max(needed);
        self.line.reserve_exact(target - self.line.len());
    }

    /// Releases the last line's buffer if it grew past [`FIXED_BUFFER`],
    /// once the line has been decoded (it is empty afterwards). Returns
    /// the reservation that covered it: the caller holds it as long as
    /// what it decoded from the line (a put's value) is alive.
    pub(crate) fn release_line(&mut self) -> Option<Reservation> {
        if self.line.capacity() > FIXED_BUFFER {
            self.line = Vec::new();
        }
        self.line_hold.take()
    }

    /// Sends every reply queued so far, bounded by the idle timeout.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        IdleTimer::bound(self.idle.as_mut(), self.io.flush()).await
    }

    /// Whether a complete request is already buffered (no socket read needed).
    pub(crate) fn has_buffered_line(&self) -> bool {
        memchr::memchr(b'\n', self.io.buffer()).is_some()
    }

    /// Queues bytes for the peer; they are sent when the buffer fills or by
    /// the next flush. Fails with [`IdleTimeout`] if the peer does not take
    /// them in time.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        IdleTimer::bound(self.idle.as_mut(), self.io.write_all(bytes)).await
    }

    /// Reads and drops input for up to `limit`, until the peer closes.
    ///
    /// Closing a socket with unread input makes the kernel send a reset,
    /// which can destroy the reply the peer has not read yet; draining
    /// first lets a final error reply arrive.
    pub(crate) async fn discard_input(&mut self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                match self.io.fill_buf().await {
                    Ok([]) | Err(_) => return,
                    Ok(buf) => {
                        let n = buf.len();
                        self.io.consume(n);
                    }
                }
            }
        })
        .await;
    }

    /// Flushes and half-closes the write side so the peer sees a clean EOF.
    pub(crate) async fn shutdown(&mut self) -> std::io::Result<()> {
        self.io.flush().await?;
        self.io.shutdown().await
    }

    /// Waits until the peer has acknowledged everything written, or until
    /// `deadline`.
    ///
    /// Closing a socket with unread input makes the kernel reset the
    /// connection and drop what it has not yet delivered, which would cut
    /// replies short for a peer that reads slowly and keeps sending; once
    /// everything is acknowledged, closing loses nothing.
    pub(crate) async fn wait_delivered(&self, deadline: tokio::time::Instant) {
        while self.io.get_ref().get_ref().unacknowledged() > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether the peer has acknowledged everything written (also when the
    /// transport cannot tell).
    pub(crate) fn delivered(&self) -> bool {
        self.io.get_ref().get_ref().unacknowledged() == 0
    }

    /// Resets the connection when it is dropped, dropping what the peer
    /// has not taken ([`PeerStream::reset_on_close`]).
    pub(crate) fn reset_on_close(&self) {
        self.io.get_ref().get_ref().reset_on_close();
    }
}

/// Bytes written to `stream` that the peer has not acknowledged yet
/// (0 when unknown).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn unacknowledged_bytes(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int for a TCP socket, and
    // `n` is a valid, writable int; no wrapper crate offers it safely.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged_bytes(_stream: &TcpStream) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    impl PeerStream for DuplexStream {}

    #[tokio::test]
    async fn a_partial_line_survives_a_cancelled_read() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = Connection::new(ours, 64);
        theirs.write_all(b"{\"op\":").await.unwrap();
        let timed_out =
            tokio::time::timeout(std::time::Duration::from_millis(20), conn.read_line()).await;
        assert!(timed_out.is_err(), "no complete line yet");
        theirs.write_all(b"\"ping\"}\r\n{}\n").await.unwrap();
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        assert_eq!(conn.line(), b"{\"op\":\"ping\"}");
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        assert_eq!(conn.line(), b"{}");
        conn.write(b"reply\n").await.unwrap();
        drop(theirs.shutdown().await);
        assert_eq!(conn.read_line().await.unwrap(), Frame::Closed);
        drop(conn);
        // Waiting for the peer flushed the reply first.
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply\n");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_from_the_last_complete_request() {
        let idle = Duration::from_secs(60);
        for sent_after in [Duration::from_secs(30), Duration::from_secs(20)] {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let mut conn = Connection::new(ours, 64).with_idle_timeout(idle);
            tokio::time::sleep(sent_after).await;
            theirs.write_all(b"{}\n{\"op\"").await.unwrap();
            assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
            conn.restart_idle_timer();
            // A partial line does not count: the clock runs from the last
            // complete request, for one to 1.25 idle timeouts.
            let started = Instant::now();
            let err = conn.read_line().await.unwrap_err();
            assert!(is_idle_timeout(&err), "{err}");
            let waited = started.elapsed();
            assert!(
                waited >= idle && waited <= idle + idle / 4,
                "closed after {waited:?}"
            );
        }
        // A socket's own timeout is not an idle timeout.
        let other = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
        assert!(!is_idle_timeout(&other));
    }

    #[tokio::test]
    async fn a_long_line_waits_for_the_budget_then_its_buffer_shrinks_back() {
        const K: usize = 1024;
        let budget = Budget::new(300 * K);
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let mut conn = Connection::new(ours, 256 * K).with_budget(Arc::clone(&budget));
        theirs.write_all(&[b'x'; 200 * K]).await.unwrap();
        theirs.write_all(b"\n{}\n").await.unwrap();
        // Not enough left: the line is not read past 64 KiB meanwhile.
        let other = budget.try_reserve(200 * K).unwrap();
        let short =
            tokio::time::timeout(std::time::Duration::from_millis(50), conn.read_line()).await;
        assert!(short.is_err(), "read a long line without its reservation");
        assert!(conn.line.len() <= FIXED_BUFFER);
        drop(other);
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        assert_eq!(conn.line().len(), 200 * K);
        // What is allocated is what is reserved: the longest line's worth.
        assert!(conn.line.capacity() <= 256 * K, "{}", conn.line.capacity());
        assert_eq!(budget.available(), 300 * K - (256 * K - FIXED_BUFFER));
        let hold = conn.release_line();
        assert_eq!(conn.line.capacity(), 0);
        drop(hold);
        assert_eq!(budget.available(), 300 * K);
        // A short line needs nothing from the budget.
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        assert_eq!(conn.line(), b"{}");
        assert!(conn.release_line().is_none());
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_too_large() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = Connection::new(ours, 8);
        theirs.write_all(b"12345678\n123456789\n").await.unwrap();
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        assert_eq!(conn.line(), b"12345678");
        assert_eq!(conn.read_line().await.unwrap(), Frame::TooLarge);
    }
}
