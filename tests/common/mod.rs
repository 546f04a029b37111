//! Shared test harness: external binaries, free ports, the real agent binary.
#![allow(dead_code)]
// Each test binary includes this harness as a private `mod common`, so its
// `pub` items are never reachable from outside; `pub` marks what tests use.
#![allow(unreachable_pub)]

use std::path::PathBuf;

pub mod cluster;
pub mod pki;

/// Finds an external tool (`redis-server`, `promtool`, `prometheus`) on PATH.
///
/// Under CI (`CI` set) a missing tool fails the test: a green run must mean the
/// test really ran. Locally the test may skip, and says why.
pub fn require_bin(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("`{name}` is required under CI but was not found on PATH")
        }
        None => {
            eprintln!("SKIPPED: `{name}` not found on PATH (install it to run this test)");
            None
        }
    }
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous bound for anything a test waits on: a loaded 2-core CI machine
/// can be slow, and a wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `cond` until it holds or `WAIT` passes; returns whether it held.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// The real `agent` binary, running with its own ports and data directory.
pub struct Agent {
    child: Option<Child>,
    pub peer_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
    log: Arc<Mutex<String>>,
}

/// How to start an agent. Settings are passed as `AGENT_*` environment
/// variables, the same mechanism operators use.
pub struct AgentOptions {
    pub env: Vec<(String, String)>,
    /// Reuse this data directory (restart tests); a fresh one otherwise.
    pub dir: Option<Arc<tempfile::TempDir>>,
    pub peer_port: Option<u16>,
    pub metrics_port: Option<u16>,
    /// Wait for the "agent ready" log line.
    pub wait_ready: bool,
    pub args: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            dir: None,
            peer_port: None,
            metrics_port: None,
            wait_ready: true,
            args: Vec::new(),
        }
    }
}

impl AgentOptions {
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

impl Agent {
    /// Starts an agent on the local backend with metrics on.
    pub fn start() -> Agent {
        Self::start_with(AgentOptions::default())
    }

    /// Ports left to the harness come from `free_port`, so another process
    /// may bind one before the agent does: then the start is retried with
    /// fresh ports (up to 3 attempts).
    pub fn start_with(opts: AgentOptions) -> Agent {
        let dir = opts
            .dir
            .clone()
            .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("tempdir")));
        let ports_ours = opts.peer_port.is_none() || opts.metrics_port.is_none();
        for attempt in 1.. {
            let mut agent = Self::spawn(&opts, Arc::clone(&dir));
            if !opts.wait_ready {
                return agent;
            }
            match agent.wait_ready() {
                Ok(()) => return agent,
                Err(log) if ports_ours && attempt < 3 && log.contains("Address already in use") => {
                    eprintln!("a port was taken by another process; retrying with fresh ports");
                }
                Err(log) => panic!("agent did not become ready:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Waits for "agent ready"; Err(output) if the agent exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let mut exited = false;
        let ready = wait_until(|| {
            if self.log().contains("agent ready") {
                return true;
            }
            exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            exited
        });
        if ready && !exited {
            return Ok(());
        }
        if exited {
            // Give the reader threads a moment to collect the last lines.
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
        Err(self.log())
    }

    fn spawn(opts: &AgentOptions, dir: Arc<tempfile::TempDir>) -> Agent {
        let peer_port = opts.peer_port.unwrap_or_else(free_port);
        let metrics_port = opts.metrics_port.unwrap_or_else(free_port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
        // No inherited AGENT_* settings: only the harness's and the test's own.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AGENT_")) {
            cmd.env_remove(k);
        }
        cmd.args(&opts.args)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("AGENT_NETWORK__LISTEN", format!("127.0.0.1:{peer_port}"))
            .env("AGENT_METRICS__ADDRESS", "127.0.0.1")
            .env("AGENT_METRICS__PORT", metrics_port.to_string())
            .env("AGENT_STORAGE__LOCAL__PATH", dir.path().join("agent.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn agent binary");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Agent {
            child: Some(child),
            peer_addr: format!("127.0.0.1:{peer_port}").parse().unwrap(),
            metrics_addr: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
            dir,
            log,
        }
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for `needle` in the output; panics with the output if the agent
    /// exits or it never appears.
    pub fn wait_for_log(&mut self, needle: &str) {
        let ok = wait_until(|| {
            if self.log().contains(needle) {
                return true;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Give the reader threads a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            false
        });
        assert!(ok, "agent never logged {needle:?}:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("agent running")
    }

    pub fn connect(&self) -> Peer {
        Peer::connect(self.peer_addr)
    }

    /// GET on the metrics endpoint: (status, headers, body).
    pub fn http_get(&self, path: &str) -> HttpResponse {
        http_get(self.metrics_addr, path)
    }

    /// The metrics page, asserting 200.
    pub fn scrape(&self) -> String {
        let resp = self.http_get("/metrics");
        assert_eq!(resp.status, 200, "scrape failed: {resp:?}");
        resp.body
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid() as i32;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    /// Stops the agent as an operator would (SIGTERM), so it exits through
    /// its shutdown path (and coverage tools get their data); SIGKILL if it
    /// takes longer than a few seconds.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs the binary to completion in `dir` (config errors, check-config,
/// startup failures), bounded by `WAIT`, with only the given `AGENT_*`
/// variables: inherited ones are removed, and RUST_BACKTRACE is on so that a
/// panic could not hide. Returns (code, stdout, stderr).
pub fn run_agent(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AGENT_")) {
        cmd.env_remove(k);
    }
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn agent");
    let read_all = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not exit:\n{}", err.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// A peer connection speaking the line protocol.
pub struct Peer {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Peer {
    pub fn connect(addr: SocketAddr) -> Peer {
        let stream = TcpStream::connect(addr).expect("connect to agent");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let writer = stream.try_clone().unwrap();
        Peer {
            reader: BufReader::new(stream),
            writer,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to agent");
    }

    /// Reads one reply line (without the newline); None on EOF.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_string()),
            Err(e) => panic!("reading reply: {e}"),
        }
    }

    /// Sends one request line and returns its reply.
    pub fn request(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\n").as_bytes());
        self.read_line().expect("agent closed the connection")
    }

    /// Sends a request and parses the reply as JSON.
    pub fn call(&mut self, req: serde_json::Value) -> serde_json::Value {
        let reply = self.request(&req.to_string());
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
    }

    pub fn put(&mut self, key: &str, value: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "put", "key": key, "value": value}))
    }

    pub fn get(&mut self, key: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "get", "key": key}))
    }

    pub fn delete(&mut self, key: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "delete", "key": key}))
    }

    /// Known traffic, every reply checked so all of it was recorded: `puts`
    /// puts of `k0`, `k1`, … with value `v`; then `gets` gets and `deletes`
    /// deletes of keys already put; then `unknown` requests with an unknown op.
    pub fn known_traffic(&mut self, puts: usize, gets: usize, deletes: usize, unknown: usize) {
        for i in 0..puts {
            assert_eq!(self.put(&format!("k{i}"), "v")["ok"], true);
        }
        for i in 0..gets {
            assert_eq!(self.get(&format!("k{i}"))["value"], "v");
        }
        for i in 0..deletes {
            assert_eq!(self.delete(&format!("k{i}"))["deleted"], true);
        }
        for _ in 0..unknown {
            assert_eq!(self.call(serde_json::json!({"op": "fly"}))["ok"], false);
        }
    }

    /// Closes with a TCP reset instead of a FIN.
    pub fn reset(self) {
        linger_zero(&self.writer);
        drop(self);
    }
}

/// Sets SO_LINGER to 0 so that closing sends RST.
fn linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
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

/// Reads one sample's value from exposition text: `name{labels} value`.
/// Labels must match exactly (order as the exporter renders them does not
/// matter). Format validity is promtool's job; this only reads numbers.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, got) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut got: Vec<String> = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    got.sort();
                    (n, got)
                }
                None => (series, Vec::new()),
            };
            (n == name && got == want)
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// A real `redis-server` on a free port, owned by the test.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// None (with a printed reason) when redis-server is missing outside CI.
    pub fn start() -> Option<RedisServer> {
        let bin = require_bin("redis-server")?;
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            bin,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(|| redis_ping(port)),
            "redis-server did not come up on {port}"
        );
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port;
        assert!(wait_until(
            || TcpStream::connect(("127.0.0.1", port)).is_err()
        ));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ---- Helpers for the protocol, durability, Redis and CLI tests ----

impl Peer {
    /// Reads until the agent closes the connection; panics if data arrives
    /// instead or nothing happens within `WAIT`. Returns how long it took.
    /// A reset counts as closed too.
    pub fn expect_closed(&mut self) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        match self.reader.read(&mut buf) {
            Ok(0) => start.elapsed(),
            Ok(n) => panic!(
                "expected the agent to close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => start.elapsed(),
            Err(e) => panic!(
                "expected the agent to close, got error {e} after {:?}",
                start.elapsed()
            ),
        }
    }

    /// Sends a request and returns its reply and how long the round trip took.
    pub fn timed_request(&mut self, line: &str) -> (String, Duration) {
        let start = Instant::now();
        let reply = self.request(line);
        (reply, start.elapsed())
    }
}

/// Sends one command to the Redis server on `port` in RESP and returns the
/// raw reply, e.g. `":1\r\n"` or `"$1\r\nv\r\n"` (simple replies only: one
/// line, or one bulk string).
pub fn redis_command(port: u16, args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect redis {port}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).expect("write to redis");
    let mut reader = BufReader::new(s);
    let mut first = String::new();
    reader.read_line(&mut first).expect("read redis reply");
    if let Some(len) = first
        .strip_prefix('$')
        .and_then(|n| n.trim_end().parse::<usize>().ok())
    {
        let mut body = vec![0u8; len + 2];
        reader.read_exact(&mut body).expect("read redis bulk reply");
        first.push_str(&String::from_utf8_lossy(&body));
    }
    first
}

impl RedisServer {
    /// The server's process id (to pause it with SIGSTOP, for example).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("redis-server running")
    }
}

// ---- Prometheus server and HTTP API helpers (operator kit, Prometheus e2e, DogStatsD tests) ----

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

/// A real `prometheus` server on a free loopback port, with its config and
/// TSDB in a temporary directory owned by the test.
pub struct Prometheus {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: Option<tempfile::TempDir>,
    log: Arc<Mutex<String>>,
}

impl Prometheus {
    /// Writes `config` to `<dir>/prometheus.yml` and starts Prometheus on it
    /// (files the config names, such as rule files or file_sd targets, can
    /// be put in `dir` beforehand). Waits until `/-/ready` answers 200.
    /// None (with a printed reason) when `prometheus` is missing outside CI.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Option<Prometheus> {
        let bin = require_bin("prometheus")?;
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let mut dir = Some(dir);
        for attempt in 1.. {
            let mut prom = Self::spawn(&bin, dir.take().unwrap(), free_port());
            match prom.wait_ready() {
                Ok(()) => return Some(prom),
                // Another process took the port after free_port() chose it.
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    dir = prom.stop();
                }
                Err(log) => panic!("prometheus did not become ready:\n{log}"),
            }
        }
        unreachable!()
    }

    fn spawn(bin: &Path, dir: tempfile::TempDir, port: u16) -> Prometheus {
        let mut child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prometheus");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Prometheus {
            child: Some(child),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: Some(dir),
            log,
        }
    }

    /// Polls `/-/ready`; Err(log) if Prometheus exits or never gets ready.
    fn wait_ready(&mut self) -> Result<(), String> {
        // Startup replays the (empty) WAL and loads rules: slow on a loaded
        // machine, so allow twice the usual wait.
        let deadline = Instant::now() + 2 * WAIT;
        while Instant::now() < deadline {
            if matches!(try_http_get(self.addr, "/-/ready", "HTTP/1.0"), Ok(r) if r.status == 200) {
                return Ok(());
            }
            if !matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Give the reader thread a moment to collect the last lines.
        std::thread::sleep(Duration::from_millis(200));
        Err(self.log())
    }

    /// Kills the server; returns its directory for another attempt.
    fn stop(&mut self) -> Option<tempfile::TempDir> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dir.take()
    }

    /// The temporary directory holding the config and the TSDB.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("running").path()
    }

    /// `start_in` with a fresh temporary directory.
    pub fn start(config: &str) -> Option<Prometheus> {
        Self::start_in(tempfile::tempdir().expect("tempdir"), config)
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET on the HTTP API, parsed as JSON (whatever the status).
    pub fn api(&self, path_and_query: &str) -> serde_json::Value {
        let resp = try_http_get(self.addr, path_and_query, "HTTP/1.0")
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}\n{}", self.log()));
        serde_json::from_str(&resp.body).unwrap_or_else(|e| {
            panic!(
                "GET {path_and_query}: HTTP {} body is not JSON ({e}): {}",
                resp.status, resp.body
            )
        })
    }

    /// An instant query: `Ok(data)` when Prometheus answers `status: success`,
    /// `Err(whole answer)` otherwise.
    pub fn try_query(&self, expr: &str) -> Result<serde_json::Value, serde_json::Value> {
        let answer = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)));
        if answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(answer)
        }
    }

    /// An instant query's result list, panicking unless it succeeds.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self
            .try_query(expr)
            .unwrap_or_else(|answer| panic!("query {expr:?} failed: {answer}"));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fields of `/proc/<pid>/stat` after the command name (which may contain
/// spaces): index 0 is field 3 (`state`), so field N is at N - 3.
pub fn proc_stat_fields(pid: u32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let fields = proc_stat_fields(pid);
    fields[14 - 3] + fields[15 - 3]
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK)");
    hz as f64
}

// ---- A real, small filesystem (full-disk tests) ----

/// A tmpfs mounted on a temporary directory for one test, so it can fill a
/// real filesystem without touching the machine's. Unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `8m`). Mounting needs
    /// root: without it, under CI (`CI` set) the test fails; locally it
    /// returns None and says why.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        if std::env::var_os("CI").is_some() {
            panic!("mounting a tmpfs is required under CI (run the tests as root): {why}");
        }
        eprintln!("SKIPPED: cannot mount a tmpfs ({why}); run the tests as root to run this test");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem with `name` until it is full; returns the bytes
    /// written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(name))
            .expect("create filler");
        let chunk = vec![0x5a_u8; 4096];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        written
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs is plain old data; all zeroes is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a valid, writable statvfs.
        assert_eq!(
            unsafe { libc::statvfs(path.as_ptr(), &mut st) },
            0,
            "statvfs"
        );
        st.f_bfree as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (an agent that outlived the test): detach it now,
            // the kernel frees it when the last file closes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
