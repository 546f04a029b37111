//! The metrics HTTP endpoint: a small, hardened HTTP/1 server.
//!
//! The exporter's built-in listener has no header-read timeout and no
//! connection cap, so a few thousand half-open connections would hold the
//! agent's file descriptors until peers could no longer connect, and it
//! answers every path. This server serves the agent's exposition with
//! those limits, `metrics.path` for metrics, `/health` (liveness), `/ready`
//! (readiness: whether storage is usable), and 404 elsewhere.
//! When the connection cap is reached the oldest connection that has not
//! completed a request is evicted, so idle connections cannot lock out a
//! scraper; idle and incomplete connections close after the header-read timeout.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;

use super::Exposition;
use crate::server::accept;
use tokio_util::sync::CancellationToken;

pub const HEALTH_PATH: &str = "/health";
/// 200 when storage is usable, 503 with the reason when it is not.
pub const READY_PATH: &str = "/ready";

/// Answers `/ready`: `Ok` when the agent can serve, else a one-line reason.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// Prometheus text exposition format 0.0.4; Prometheus 3 rejects a scrape
/// without a valid Content-Type.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After this a connection is asked to close (an in-flight request still
/// completes), so keep-alive connections cannot be held forever.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(20);
/// How long a connection asked to close may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the endpoint serves and to whom.
pub struct Endpoint {
    pub exposition: Exposition,
    pub path: String,
    pub allowed_networks: Vec<IpNet>,
    pub max_connections: usize,
    pub ready: ReadyCheck,
}

impl Endpoint {
    fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allowed_networks.is_empty() || self.allowed_networks.iter().any(|n| n.contains(&ip))
    }

    fn respond(&self, req: &Request<Incoming>, allowed: bool) -> Response<Full<Bytes>> {
        if !allowed {
            return plain(StatusCode::FORBIDDEN, "Forbidden\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        }
        match req.uri().path() {
            p if p == self.path => {
                let mut resp = Response::new(Full::new(Bytes::from(self.exposition.render())));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
                resp
            }
            HEALTH_PATH => plain(StatusCode::OK, "OK\n"),
            READY_PATH => match (self.ready)() {
                Ok(()) => plain(StatusCode::OK, "OK\n"),
                Err(reason) => {
                    let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, "");
                    *resp.body_mut() = Full::new(Bytes::from(format!("{reason}\n")));
                    resp
                }
            },
            _ => plain(StatusCode::NOT_FOUND, "Not Found\n"),
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The connection cap. When it is reached, a new connection is still
/// admitted and the oldest connection that has not completed a request gives
/// way (or, if every one has, the oldest). Refusing newcomers instead would
/// let a few idle connections lock Prometheus out until they time out.
struct Slots {
    max: usize,
    open: Mutex<(u64, VecDeque<Arc<Slot>>)>,
}

struct Slot {
    id: u64,
    served: AtomicBool,
    evict: CancellationToken,
}

/// Holds a slot for one connection; gives it back on drop.
struct SlotGuard {
    slots: Arc<Slots>,
    slot: Arc<Slot>,
}

impl Slots {
    fn admit(self: &Arc<Self>) -> SlotGuard {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.1.len() >= self.max {
            let victim = open
                .1
                .iter()
                .position(|s| !s.served.load(Ordering::Relaxed))
                .unwrap_or(0);
            if let Some(v) = open.1.remove(victim) {
                v.evict.cancel();
            }
        }
        open.0 += 1;
        let slot = Arc::new(Slot {
            id: open.0,
            served: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        open.1.push_back(Arc::clone(&slot));
        SlotGuard {
            slots: Arc::clone(self),
            slot,
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = open.1.iter().position(|s| s.id == self.slot.id) {
            open.1.remove(i);
        }
    }
}

/// Accepts and serves connections until `cancel` fires.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, cancel: CancellationToken) {
    let slots = Arc::new(Slots {
        max: endpoint.max_connections,
        open: Mutex::new((0, VecDeque::new())),
    });
    let endpoint = Arc::new(endpoint);
    loop {
        let Some((stream, remote)) = accept(&listener, &cancel, "metrics endpoint").await else {
            return;
        };
        let guard = slots.admit();
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            serve_connection(stream, remote, &endpoint, &guard.slot).await;
            drop(guard);
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    endpoint: &Arc<Endpoint>,
    slot: &Arc<Slot>,
) {
    let allowed = endpoint.allows(remote.ip());
    let ep = Arc::clone(endpoint);
    let served = Arc::clone(slot);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        served.served.store(true, Ordering::Relaxed);
        let resp = ep.respond(&req, allowed);
        async move { Ok::<_, Infallible>(resp) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(16 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = slot.evict.cancelled() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}
