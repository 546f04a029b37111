//! The metrics HTTP endpoint: a small, hardened HTTP/1 server.
//!
//! The exporter's built-in listener has no header-read timeout and no
//! connection cap, so a few thousand half-open connections would hold the
//! agent's file descriptors until peers could no longer connect, and it
//! answers every path. This server serves the same `PrometheusHandle` with
//! those limits, `metrics.path` for metrics, `/health`, and 404 elsewhere.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub const HEALTH_PATH: &str = "/health";
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
    pub handle: PrometheusHandle,
    pub path: String,
    pub allowed_networks: Vec<IpNet>,
    pub max_connections: usize,
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
                let mut resp = Response::new(Full::new(Bytes::from(self.handle.render())));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
                resp
            }
            HEALTH_PATH => plain(StatusCode::OK, "OK\n"),
            _ => plain(StatusCode::NOT_FOUND, "Not Found\n"),
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Accepts and serves connections until `cancel` fires.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(endpoint.max_connections));
    let endpoint = Arc::new(endpoint);
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%remote, "metrics endpoint: connection limit reached, closing");
            continue;
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            serve_connection(stream, remote, &endpoint).await;
            drop(slot);
        });
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, remote: SocketAddr, endpoint: &Arc<Endpoint>) {
    let allowed = endpoint.allows(remote.ip());
    let ep = Arc::clone(endpoint);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
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
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}
