//! Line framing over one peer stream (TCP today; any byte stream, such as
//! TLS over TCP, through [`PeerStream`]).
//!
//! Reads and writes are buffered with fixed capacities, and replies are
//! flushed only when no complete request is left to read. A peer that
//! pipelines without reading its replies fills the socket, our writes then
//! wait, and we stop reading: back-pressure instead of unbounded buffers.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::time::Instant;

const READ_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 64 * 1024;

/// What [`Connection::read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n` (and `\r`), in [`Connection::line`].
    Line,
    /// The peer closed the connection (any partial line is dropped).
    Closed,
    /// The line grew past the limit; the connection cannot be resynchronised.
    TooLarge,
}

/// A byte stream a peer connection runs over.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Bytes written that the peer has not acknowledged yet (0 when the
    /// transport cannot tell). A TLS stream answers for its TCP socket.
    fn unacknowledged(&self) -> usize {
        0
    }
}

impl PeerStream for TcpStream {
    fn unacknowledged(&self) -> usize {
        unacknowledged_bytes(self)
    }
}

/// One peer connection: requests in as lines, replies out, both buffered.
/// What a read or write fails with when the peer sent no complete request
/// for the idle timeout: whether it is silent or has stopped reading its
/// replies, it holds a connection slot and buffers for nothing.
#[derive(Debug, thiserror::Error)]
#[error("no complete request within network.idle_timeout")]
pub struct IdleTimeout;

/// Whether `e` is an [`IdleTimeout`] (and not an I/O error of the socket).
pub fn is_idle_timeout(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<IdleTimeout>())
}

/// Awaits `io`, giving up with [`IdleTimeout`] at `deadline` (if any).
async fn until<T>(
    deadline: Option<Instant>,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match deadline {
        None => io.await,
        Some(at) => tokio::time::timeout_at(at, io).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                IdleTimeout,
            ))
        }),
    }
}

pub struct Connection<S> {
    /// Reads are buffered here; writes pass through to the write buffer
    /// (one object, as reads and writes never run concurrently).
    io: BufReader<BufWriter<S>>,
    /// The line being read, or the last one read.
    line: Vec<u8>,
    /// `line` holds a complete line that was returned: the next read starts
    /// a new one. Until then, a partial line survives a cancelled read.
    line_complete: bool,
    max_line: usize,
    /// How long the peer may go without completing a request (inbound
    /// connections; outbound ones have their ping deadline instead).
    idle_timeout: Option<Duration>,
    /// When the current idle period ends: waits on the peer (reading,
    /// flushing, writing) fail with [`IdleTimeout`] from then on.
    idle_deadline: Option<Instant>,
}

impl Connection<TcpStream> {
    /// A TCP connection, with Nagle's algorithm off: replies are flushed
    /// when due and must not wait for an acknowledgement.
    pub fn tcp(stream: TcpStream, max_line: usize) -> Self {
        let _ = stream.set_nodelay(true);
        Self::new(stream, max_line)
    }
}

impl<S: PeerStream> Connection<S> {
    pub fn new(stream: S, max_line: usize) -> Self {
        Self {
            io: BufReader::with_capacity(
                READ_BUFFER,
                BufWriter::with_capacity(WRITE_BUFFER, stream),
            ),
            line: Vec::new(),
            line_complete: false,
            max_line,
            idle_timeout: None,
            idle_deadline: None,
        }
    }

    /// Closes the connection (reads and writes fail with [`IdleTimeout`])
    /// when no request completes for `timeout`; the clock starts now.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self.restart_idle_timer();
        self
    }

    /// A request completed: the peer gets another full idle timeout.
    pub fn restart_idle_timer(&mut self) {
        self.idle_deadline = self.idle_timeout.map(|t| Instant::now() + t);
    }

    /// The longest line accepted.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The last line read.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Reads the next line. Cancel-safe: bytes already taken from the
    /// socket stay in `self.line`, and the next call carries on with them.
    pub async fn read_line(&mut self) -> std::io::Result<Frame> {
        if self.line_complete {
            self.line.clear();
            self.line_complete = false;
        }
        loop {
            let deadline = self.idle_deadline;
            if !self.has_buffered_line() {
                // We are about to wait for the peer: it must have every reply first.
                until(deadline, self.io.flush()).await?;
            }
            let buf = until(deadline, self.io.fill_buf()).await?;
            if buf.is_empty() {
                return Ok(Frame::Closed);
            }
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    if self.line.len() + i > self.max_line {
                        return Ok(Frame::TooLarge);
                    }
                    self.line.extend_from_slice(&buf[..i]);
                    self.io.consume(i + 1);
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    self.line_complete = true;
                    return Ok(Frame::Line);
                }
                None => {
                    let n = buf.len();
                    if self.line.len() + n > self.max_line {
                        return Ok(Frame::TooLarge);
                    }
                    self.line.extend_from_slice(buf);
                    self.io.consume(n);
                }
            }
        }
    }

    /// Whether a complete request is already buffered (no socket read needed).
    pub fn has_buffered_line(&self) -> bool {
        memchr::memchr(b'\n', self.io.buffer()).is_some()
    }

    /// Queues bytes for the peer; they are sent when the buffer fills or by
    /// the next flush. Fails with [`IdleTimeout`] if the peer does not take
    /// them in time.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        until(self.idle_deadline, self.io.write_all(bytes)).await
    }

    /// Reads and drops input for up to `limit`, until the peer closes.
    ///
    /// Closing a socket with unread input makes the kernel send a reset,
    /// which can destroy the reply the peer has not read yet; draining
    /// first lets a final error reply arrive.
    pub async fn discard_input(&mut self, limit: std::time::Duration) {
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
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
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
    pub async fn wait_delivered(&self, deadline: tokio::time::Instant) {
        while self.io.get_ref().get_ref().unacknowledged() > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Bytes written to `stream` that the peer has not acknowledged yet
/// (0 when unknown).
#[cfg(target_os = "linux")]
fn unacknowledged_bytes(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int for a TCP socket.
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

    #[tokio::test]
    async fn idle_timeout_counts_from_the_last_complete_request() {
        let idle = Duration::from_millis(300);
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = Connection::new(ours, 64).with_idle_timeout(idle);
        tokio::time::sleep(idle / 2).await;
        theirs.write_all(b"{}\n{\"op\"").await.unwrap();
        assert_eq!(conn.read_line().await.unwrap(), Frame::Line);
        conn.restart_idle_timer();
        // A partial line does not count: the clock runs from the last complete one.
        let started = Instant::now();
        let err = conn.read_line().await.unwrap_err();
        assert!(is_idle_timeout(&err), "{err}");
        assert!(started.elapsed() >= idle, "{:?}", started.elapsed());
        // A socket's own timeout is not an idle timeout.
        let other = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
        assert!(!is_idle_timeout(&other));
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
