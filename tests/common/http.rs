//! Minimal HTTP/1 GETs over real TCP: the agent's metrics endpoint and
//! Prometheus' HTTP API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::WAIT;

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The status and the body, for comparing both at once.
    pub fn status_and_body(self) -> (u16, String) {
        (self.status, self.body)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`, panicking on failure.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    try_http_get(addr, path, "HTTP/1.1").unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// A minimal GET that reads until the server closes. `version` is
/// `HTTP/1.1` (sent with `Connection: close`) or `HTTP/1.0`, for which
/// servers send the body without chunked encoding (Go's net/http does).
pub fn try_http_get(addr: SocketAddr, path: &str, version: &str) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(WAIT))?;
    let close = if version == "HTTP/1.1" {
        "Connection: close\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "GET {path} {version}\r\nHost: {addr}\r\n{close}\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// A request with any method and an empty body, HTTP/1.1 with
/// `Connection: close`, read until the server closes; panics on failure.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let send = || -> std::io::Result<HttpResponse> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(WAIT))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_http_response(&raw)
    };
    send().unwrap_or_else(|e| panic!("{method} {path} from {addr}: {e}"))
}

/// GET with extra request headers; (status, headers, raw body bytes).
pub fn get_with_headers(
    addr: SocketAddr,
    path: &str,
    headers: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}

/// Splits a whole HTTP/1 response (read until close) into status, headers
/// and body.
pub fn parse_http_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let bad = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {text:?}"))
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP head"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Percent-encodes `s` as a URL query value: RFC 3986 unreserved characters
/// pass, every other byte becomes `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
