//! Line framing over one peer stream: plain TCP or TLS over TCP.
//!
//! Reads and writes are buffered with fixed capacities, and replies are
//! flushed only when no complete request is left to read. A peer that
//! pipelines without reading its replies fills the socket, our writes then
//! wait, and we stop reading: back-pressure instead of unbounded buffers.

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

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

/// A stream a peer connection runs over: TCP, or TLS over TCP. The
/// descriptor is the TCP socket's, to ask the kernel what is unacknowledged.
pub trait PeerStream: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send> PeerStream for S {}

/// One peer connection, framed in lines. Reads and writes alternate (a
/// request is read, its reply written), so one buffered stream serves both
/// directions without splitting it.
pub struct Connection<S = TcpStream> {
    stream: BufReader<BufWriter<S>>,
    fd: RawFd,
    line: Vec<u8>,
    max_line: usize,
}

/// Sets TCP_NODELAY: replies are already batched by the write buffer, and
/// Nagle would hold the last one back for a delayed ACK.
pub fn prepare(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

impl<S: PeerStream> Connection<S> {
    pub fn new(stream: S, max_line: usize) -> Self {
        let fd = stream.as_raw_fd();
        Self {
            stream: BufReader::with_capacity(
                READ_BUFFER,
                BufWriter::with_capacity(WRITE_BUFFER, stream),
            ),
            fd,
            line: Vec::new(),
            max_line,
        }
    }

    /// The last line read.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Reads the next line. Cancel-safe between calls: bytes already taken
    /// from the socket stay in `self.line`.
    pub async fn read_line(&mut self) -> std::io::Result<Frame> {
        self.line.clear();
        loop {
            if !self.has_buffered_line() {
                // We are about to wait for the peer: it must have every reply first.
                self.stream.flush().await?;
            }
            let buf = self.stream.fill_buf().await?;
            if buf.is_empty() {
                return Ok(Frame::Closed);
            }
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    if self.line.len() + i > self.max_line {
                        return Ok(Frame::TooLarge);
                    }
                    self.line.extend_from_slice(&buf[..i]);
                    self.stream.consume(i + 1);
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    return Ok(Frame::Line);
                }
                None => {
                    let n = buf.len();
                    if self.line.len() + n > self.max_line {
                        return Ok(Frame::TooLarge);
                    }
                    self.line.extend_from_slice(buf);
                    self.stream.consume(n);
                }
            }
        }
    }

    /// Whether a complete request is already buffered (no socket read needed).
    pub fn has_buffered_line(&self) -> bool {
        memchr::memchr(b'\n', self.stream.buffer()).is_some()
    }

    /// Queues bytes for the peer; they are sent when the buffer fills or by
    /// the next flush.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads and drops input for up to `limit`, until the peer closes.
    ///
    /// Closing a socket with unread input makes the kernel send a reset,
    /// which can destroy the reply the peer has not read yet; draining
    /// first lets a final error reply arrive.
    pub async fn discard_input(&mut self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                match self.stream.fill_buf().await {
                    Ok([]) | Err(_) => return,
                    Ok(buf) => {
                        let n = buf.len();
                        self.stream.consume(n);
                    }
                }
            }
        })
        .await;
    }

    /// Flushes and half-closes the write side so the peer sees a clean EOF.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.stream.flush().await?;
        self.stream.shutdown().await
    }

    /// Waits until the peer has acknowledged everything written, or until
    /// `deadline`.
    ///
    /// Closing a socket with unread input makes the kernel reset the
    /// connection and drop what it has not yet delivered, which would cut
    /// replies short for a peer that reads slowly and keeps sending; once
    /// everything is acknowledged, closing loses nothing.
    pub async fn wait_delivered(&self, deadline: tokio::time::Instant) {
        while unacknowledged_bytes(self.fd) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Bytes written to `stream` that the peer has not acknowledged yet
/// (0 when unknown).
#[cfg(target_os = "linux")]
fn unacknowledged_bytes(fd: RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int for a TCP socket; `fd`
    // is the connection's own socket, open for as long as `self` lives.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged_bytes(_fd: RawFd) -> libc::c_int {
    0
}
