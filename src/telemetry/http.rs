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
//!
//! With `metrics.web_config_file` it serves HTTPS (rustls) and requires
//! basic authentication, as node_exporter does with the same file. The
//! rules cover every path, `/health` included: whoever may not scrape
//! learns nothing from this port, not even that the agent is up.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, VARY,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::auth::BasicAuth;
use super::handles::sockets_full_alarm;
use super::protobuf::PROTOBUF_CONTENT_TYPE;
use super::{Exposition, HttpMetrics};
use crate::config::{HEALTH_PATH, READY_PATH};
use crate::net::{accept, allowed, Admission, Admitted, SocketBudget, Ticket, WhenAllServed};

/// 200 when storage is usable, 503 with the reason when it is not.
/// An allow-list the configuration reload can replace while serving.
pub type SharedNetworks = Arc<std::sync::RwLock<Vec<IpNet>>>;

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
    /// Renders the scrape.
    pub exposition: Exposition,
    /// `metrics.path`.
    pub path: String,
    /// `metrics.allowed_networks`; replaced on a configuration reload.
    pub allowed_networks: SharedNetworks,
    /// `metrics.max_connections`: connections beyond it are closed at once.
    pub max_connections: usize,
    /// HTTPS, from the web config file; None serves plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// Basic authentication, from the web config file; None admits all.
    pub auth: Option<BasicAuth>,
    /// 401s and failed handshakes.
    pub metrics: HttpMetrics,
    /// What `/ready` reports.
    pub ready: ReadyCheck,
}

impl Endpoint {
    fn allows(&self, ip: IpAddr) -> bool {
        let networks = self
            .allowed_networks
            .read()
            .unwrap_or_else(|e| e.into_inner());
        allowed(&networks, ip)
    }

    /// Answers one request, and counts it when it is for `metrics.path`.
    async fn answer(&self, req: &Request<Incoming>, allowed: bool) -> Response<Full<Bytes>> {
        let resp = self.authorize_and_route(req, allowed).await;
        // A served scrape was counted before rendering, so it counts itself.
        if req.uri().path() == self.path && resp.status() != StatusCode::OK {
            self.metrics.scraped(resp.status().as_u16());
        }
        resp
    }

    /// Allow-list, then credentials, then the route.
    async fn authorize_and_route(
        &self,
        req: &Request<Incoming>,
        allowed: bool,
    ) -> Response<Full<Bytes>> {
        if allowed {
            if let Some(auth) = &self.auth {
                if !auth.check(req.headers()).await {
                    self.metrics.unauthorized.increment(1);
                    let mut resp = plain(StatusCode::UNAUTHORIZED, "Unauthorized\n");
                    resp.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"agent\""),
                    );
                    return resp;
                }
            }
        }
        self.respond(req, allowed)
    }

    fn respond(&self, req: &Request<Incoming>, allowed: bool) -> Response<Full<Bytes>> {
        if !allowed {
            return plain(StatusCode::FORBIDDEN, "Forbidden\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match req.uri().path() {
            p if p == self.path => {
                self.metrics.scraped(200);
                let (page, content_type) = if wants_protobuf(req) {
                    (self.exposition.render_protobuf(), PROTOBUF_CONTENT_TYPE)
                } else {
                    (self.exposition.render().into_bytes(), TEXT_CONTENT_TYPE)
                };
                let compressed = if accepts_gzip(req) {
                    gzipped(&page)
                } else {
                    None
                };
                let mut resp = match compressed {
                    Some(compressed) => {
                        let mut resp = Response::new(Full::new(Bytes::from(compressed)));
                        resp.headers_mut()
                            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                        resp
                    }
                    None => Response::new(Full::new(Bytes::from(page))),
                };
                let headers = resp.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                headers.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
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

/// Whether the scraper asks for the protobuf format (length-delimited
/// `io.prometheus.client.MetricFamily`) at least as much as for any text
/// format this endpoint serves for it (`text/plain`, OpenMetrics text, `*/*`),
/// as Prometheus does when it ingests native histograms. Without an
/// `Accept`, or with one that prefers text, the scrape is text.
fn wants_protobuf(req: &Request<Incoming>) -> bool {
    let (mut protobuf, mut text) = (0.0f32, 0.0f32);
    let ranges = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut proto, mut delimited) = (1.0f32, false, false);
        for param in parts {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            let value = value.trim().trim_matches('"');
            match name.trim().to_ascii_lowercase().as_str() {
                "q" => q = value.parse().unwrap_or(0.0),
                "proto" => proto = value == "io.prometheus.client.MetricFamily",
                "encoding" => delimited = value == "delimited",
                _ => {}
            }
        }
        match media.as_str() {
            "application/vnd.google.protobuf" if proto && delimited => protobuf = protobuf.max(q),
            "text/plain" | "text/*" | "*/*" | "application/openmetrics-text" => text = text.max(q),
            _ => {}
        }
    }
    protobuf > 0.0 && protobuf >= text
}

/// Whether the client takes a gzip body (`Accept-Encoding: gzip`, or `*`,
/// with a q-value above 0), as Prometheus sends by default.
fn accepts_gzip(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (name.eq_ignore_ascii_case("gzip") || name == "*") && q > 0.0
        })
}

/// The page gzipped at the default level, as client_golang serves it; None
/// (send it plain) if compression fails, which in memory it does not.
fn gzipped(page: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(page.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(page).ok()?;
    encoder.finish().ok()
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

/// Accepts and serves connections until `cancel` fires.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, cancel: CancellationToken) {
    let admission = Admission::with_policy(endpoint.max_connections, WhenAllServed::EvictOldest);
    let sockets = SocketBudget::for_cap(
        endpoint.max_connections,
        sockets_full_alarm(
            "metrics",
            "metrics.max_connections",
            endpoint.max_connections,
        ),
    );
    let endpoint = Arc::new(endpoint);
    loop {
        let Some((stream, remote, permit)) =
            accept(&listener, &sockets, &cancel, "metrics endpoint").await
        else {
            return;
        };
        let (Admitted::Yes(ticket) | Admitted::Evicting(ticket)) = admission.admit() else {
            unreachable!("the metrics endpoint's cap evicts instead of refusing")
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            let _permit = permit;
            match &endpoint.tls {
                None => serve_connection(stream, remote, &endpoint, &ticket).await,
                Some(acceptor) => {
                    if let Some(tls) = handshake(acceptor, stream, &endpoint, &ticket).await {
                        serve_connection(tls, remote, &endpoint, &ticket).await;
                    }
                }
            }
            drop(ticket);
        });
    }
}

/// The server side of the TLS handshake, within the header-read timeout
/// (a stalled handshake is an incomplete request like any other) and
/// giving way to eviction. A failure is counted.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    endpoint: &Endpoint,
    ticket: &Ticket,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let result = tokio::select! {
        r = tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)) => r,
        _ = ticket.evicted() => return None,
    };
    match result {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            endpoint.metrics.tls_handshake_failures.increment(1);
            tracing::debug!(error = %e, "metrics endpoint: TLS handshake failed");
            None
        }
        Err(_) => {
            endpoint.metrics.tls_handshake_failures.increment(1);
            tracing::debug!("metrics endpoint: TLS handshake timed out");
            None
        }
    }
}

async fn serve_connection<IO>(
    stream: IO,
    remote: SocketAddr,
    endpoint: &Arc<Endpoint>,
    ticket: &Ticket,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let allowed = endpoint.allows(remote.ip());
    let ep = Arc::clone(endpoint);
    let served = ticket.served_mark();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        served.served();
        let ep = Arc::clone(&ep);
        async move { Ok::<_, Infallible>(ep.answer(&req, allowed).await) }
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
        _ = ticket.evicted() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}
