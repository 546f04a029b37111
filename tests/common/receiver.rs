//! A remote-write receiver the tests script: each request gets the next
//! scripted answer (a status, 429 with `Retry-After`, an answer slower
//! than the agent's timeout, or a connection reset), then the fallback
//! answer. Every request is kept, decoded, with its headers and the
//! answer it got. Plain HTTP, or TLS with an optional required
//! `Authorization`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::telemetry::remote_write::wire::{self, WriteRequest};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::pki::Leaf;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// This status, empty body (`400` gets a short text body).
    Status(u16),
    /// 429 with this `Retry-After` value.
    Throttle(String),
    /// 200, but only after this long.
    Slow(Duration),
    /// Close the connection with a TCP reset, no answer.
    Reset,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When its body was read.
    pub at: Instant,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    /// The decoded body.
    pub request: WriteRequest,
    /// The answer it got: "200", "500", "429", "400", "401", "slow" or "reset".
    pub answer: String,
}

impl Received {
    /// Samples in it, a native histogram counting as one.
    pub fn samples(&self) -> usize {
        self.request
            .timeseries
            .iter()
            .map(|s| s.samples.len() + s.histograms.len())
            .sum()
    }

    /// The latest value of the series named `name` (without labels beyond
    /// those the agent adds).
    pub fn last_value(&self, name: &str) -> Option<f64> {
        self.request
            .timeseries
            .iter()
            .find(|s| {
                s.labels
                    .iter()
                    .any(|l| l.name == "__name__" && l.value == name)
            })
            .and_then(|s| s.samples.last())
            .map(|s| s.value)
    }
}

struct Inner {
    script: Mutex<VecDeque<Answer>>,
    fallback: Mutex<Answer>,
    received: Mutex<Vec<Received>>,
    /// Answer 401 unless `Authorization` is exactly this.
    authorization: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The receiver; it runs until the test ends.
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    /// Plain HTTP on a free loopback port.
    pub fn start(script: Vec<Answer>) -> Receiver {
        Self::start_inner(script, None, None)
    }

    /// HTTPS with `leaf`'s certificate; with `authorization`, any request
    /// without exactly that header is answered 401.
    pub fn start_tls(script: Vec<Answer>, leaf: &Leaf, authorization: Option<String>) -> Receiver {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert_file)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&leaf.key_file).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Self::start_inner(script, Some(Arc::new(config)), authorization)
    }

    fn start_inner(
        script: Vec<Answer>,
        tls: Option<Arc<rustls::ServerConfig>>,
        authorization: Option<String>,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            script: Mutex::new(script.into()),
            fallback: Mutex::new(Answer::Status(200)),
            received: Mutex::new(Vec::new()),
            authorization,
            tls,
        });
        let shared = Arc::clone(&inner);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let inner = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &inner));
            }
        });
        Receiver { addr, inner }
    }

    /// The write URL (`https://localhost:…` with TLS, so the name verifies).
    pub fn url(&self) -> String {
        match self.inner.tls {
            Some(_) => format!("https://localhost:{}/api/v1/write", self.addr.port()),
            None => format!("http://{}/api/v1/write", self.addr),
        }
    }

    /// The answer once the script is used up (200 at first).
    pub fn set_fallback(&self, answer: Answer) {
        *self.inner.fallback.lock().unwrap() = answer;
    }

    /// The answer each request got so far, in arrival order.
    pub fn answers(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.answer).collect()
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, inner: &Inner) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let fd = stream.as_raw_fd();
    match &inner.tls {
        None => requests(stream, fd, inner),
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(Arc::clone(config)) else {
                return;
            };
            requests(rustls::StreamOwned::new(conn, stream), fd, inner);
        }
    }
}

/// Answers requests on one connection until it closes or is reset.
fn requests<S: Read + Write>(stream: S, fd: i32, inner: &Inner) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut headers = BTreeMap::new();
        let mut line = String::new();
        match stream.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            line.clear();
            if stream.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let request = wire::decode(&body).unwrap_or_else(|e| panic!("bad body: {e}"));
        let authorized = inner
            .authorization
            .as_ref()
            .is_none_or(|want| headers.get("authorization") == Some(want));
        let answer = if authorized {
            let next = inner.script.lock().unwrap().pop_front();
            next.unwrap_or_else(|| inner.fallback.lock().unwrap().clone())
        } else {
            Answer::Status(401)
        };
        let name = match &answer {
            Answer::Status(code) => code.to_string(),
            Answer::Throttle(_) => "429".to_string(),
            Answer::Slow(_) => "slow".to_string(),
            Answer::Reset => "reset".to_string(),
        };
        inner.received.lock().unwrap().push(Received {
            at: Instant::now(),
            headers,
            request,
            answer: name,
        });
        let response = match answer {
            Answer::Status(400) => {
                let body = "bad request: out of order sample\n";
                format!("HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            }
            Answer::Status(code) => {
                format!("HTTP/1.1 {code} Status\r\nContent-Length: 0\r\n\r\n")
            }
            Answer::Throttle(after) => format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {after}\r\nContent-Length: 0\r\n\r\n"
            ),
            Answer::Slow(delay) => {
                std::thread::sleep(delay);
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string()
            }
            Answer::Reset => {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on a socket this thread owns, with a
                // linger struct that outlives the call.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                return;
            }
        };
        let out = stream.get_mut();
        if out
            .write_all(response.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}
