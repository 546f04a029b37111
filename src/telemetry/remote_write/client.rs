//! One HTTP/1.1 connection to the receiver, kept open between requests,
//! and what each request's answer means for the samples it carried.
//!
//! hyper's connection-level client over tokio-rustls: both are already in
//! the agent for its own endpoint, and a request needs no pool, proxy or
//! redirect, which a full client crate would add.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::wire;
use crate::config::RemoteWrite;
// The receiver is not ours: its bytes must not forge log lines.
use crate::net::preview;

/// Most bytes of an error answer read; a preview of them is logged.
const MAX_ERROR_BODY: usize = 4096;

/// Why a request is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// A 5xx answer.
    ServerError,
    /// 429 Too Many Requests.
    Throttled,
    /// No complete answer within `timeout`.
    Timeout,
    /// Could not connect, or the connection failed mid-request.
    Connection,
}

/// What a request's answer means for its samples.
#[derive(Debug)]
pub(super) enum Outcome {
    /// 2xx: stored.
    Sent,
    /// Try again later: after `after` when the receiver said so.
    Retry {
        /// Why.
        why: Retry,
        /// `Retry-After`, when given.
        after: Option<Duration>,
        /// For the log: the status and an escaped preview of the answer.
        detail: String,
    },
    /// Any other answer (4xx but 429): the receiver will never take these
    /// samples, so they are given up.
    Rejected {
        /// For the log: the status and an escaped preview of the answer.
        detail: String,
    },
}

/// The receiver's address and credentials, and the open connection.
pub(super) struct Client {
    url: url::Url,
    host: String,
    port: u16,
    /// The `Host` header.
    authority: HeaderValue,
    /// The request target: path and query.
    target: String,
    authorization: Option<HeaderValue>,
    user_agent: HeaderValue,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
    /// The connection's request half; None until connected, or after a
    /// failure, when the next request connects anew.
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for the configured receiver; connects on first use.
    pub(super) fn new(cfg: &RemoteWrite) -> Self {
        let url = cfg.url.clone();
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        // IPv6 literals come bracketed from the URL; connecting and SNI
        // want them bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Self {
            url,
            host,
            port,
            authority: HeaderValue::from_str(&authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            target,
            authorization: cfg.authorization.as_ref().and_then(|s| {
                let mut v = HeaderValue::from_str(s.expose()).ok()?;
                v.set_sensitive(true);
                Some(v)
            }),
            user_agent: HeaderValue::from_static(concat!("agent/", env!("CARGO_PKG_VERSION"))),
            tls: cfg.tls.clone(),
            timeout: cfg.timeout,
            conn: None,
        }
    }

    /// The receiver's URL, for logs (it holds no credentials).
    pub(super) fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Sends one compressed write request and reads the answer, all
    /// within `timeout`.
    pub(super) async fn send(&mut self, body: Bytes) -> Outcome {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The answer may still come on this connection: never reuse it.
                self.conn = None;
                Outcome::Retry {
                    why: Retry::Timeout,
                    after: None,
                    detail: format!("no answer within {:?}", self.timeout),
                }
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Outcome {
        let connection_error = |detail: String| Outcome::Retry {
            why: Retry::Connection,
            after: None,
            detail,
        };
        let mut conn = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => match self.connect().await {
                Ok(c) => c,
                Err(e) => return connection_error(e),
            },
        };
        if let Err(e) = conn.ready().await {
            return connection_error(format!("connection closed: {e}"));
        }
        let mut request = Request::post(self.target.as_str())
            .header(header::HOST, self.authority.clone())
            .header(header::CONTENT_TYPE, wire::CONTENT_TYPE)
            .header(header::CONTENT_ENCODING, wire::CONTENT_ENCODING)
            .header("X-Prometheus-Remote-Write-Version", wire::VERSION)
            .header(header::USER_AGENT, self.user_agent.clone());
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = match request.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return connection_error(format!("cannot build the request: {e}")),
        };
        let response = match conn.send_request(request).await {
            Ok(r) => r,
            Err(e) => return connection_error(format!("request failed: {e}")),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let keep_alive = !response
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes());
        match &body {
            Ok(_) if keep_alive => self.conn = Some(conn),
            _ => {}
        }
        let detail = match &body {
            Ok(b) if b.is_empty() => status.to_string(),
            Ok(b) => format!("{status}: {}", preview(b)),
            Err(_) => format!("{status} (answer unread)"),
        };
        classify(status, retry_after, detail)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => handshake(stream).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{:?} is not a TLS server name: {e}", self.host))?;
                let stream = TlsConnector::from(Arc::clone(tls))
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake with {} failed: {e}", self.host))?;
                handshake(stream).await
            }
        }
    }
}

/// Starts HTTP/1.1 on a connected stream; the connection runs in its own
/// task until either side closes it.
async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Prometheus's rules: 2xx stored; 5xx and 429 retried; anything else
/// refused for good.
fn classify(status: StatusCode, after: Option<Duration>, detail: String) -> Outcome {
    if status.is_success() {
        Outcome::Sent
    } else if status.is_server_error() {
        Outcome::Retry {
            why: Retry::ServerError,
            after,
            detail,
        }
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry {
            why: Retry::Throttled,
            after,
            detail,
        }
    } else {
        Outcome::Rejected { detail }
    }
}

/// `Retry-After`: seconds, or an HTTP date (a past one means now).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn statuses_are_classified_as_prometheus_does() {
        let c = |code: u16| classify(StatusCode::from_u16(code).unwrap(), None, String::new());
        assert!(matches!(c(200), Outcome::Sent));
        assert!(matches!(c(204), Outcome::Sent));
        assert!(matches!(
            c(500),
            Outcome::Retry {
                why: Retry::ServerError,
                ..
            }
        ));
        assert!(matches!(
            c(503),
            Outcome::Retry {
                why: Retry::ServerError,
                ..
            }
        ));
        assert!(matches!(
            c(429),
            Outcome::Retry {
                why: Retry::Throttled,
                ..
            }
        ));
        assert!(matches!(c(400), Outcome::Rejected { .. }));
        assert!(matches!(c(404), Outcome::Rejected { .. }));
        assert!(matches!(c(301), Outcome::Rejected { .. }));
    }
}
