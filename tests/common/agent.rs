//! The real `agent` binary: started with its own ports and data directory
//! ([`Agent`]), or run to completion ([`run_agent`]), and the waits tests
//! put on what it exports.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, http_get, sample, wait_until, HttpResponse, Peer, WAIT};

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
    /// The command that runs the agent, in place of this build's binary:
    /// another build (a cross-compiled or static one), possibly behind a
    /// runner such as `qemu-aarch64 -L /usr/aarch64-linux-gnu`.
    pub program: Option<Vec<String>>,
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
            program: None,
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
        let mut cmd = match opts.program.as_deref() {
            Some([program, args @ ..]) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            _ => Command::new(env!("CARGO_BIN_EXE_agent")),
        };
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

/// Starts an agent on the data directory of a previous one.
pub fn restart_on(dir: &Arc<tempfile::TempDir>) -> Agent {
    Agent::start_with(AgentOptions {
        dir: Some(Arc::clone(dir)),
        ..AgentOptions::default()
    })
}

/// Polls the endpoint until the sample has exactly `want`; panics with the
/// last value and the agent's output otherwise.
pub fn wait_for_value(agent: &Agent, name: &str, labels: &[(&str, &str)], want: f64) {
    let mut last = None;
    let ok = wait_until(|| {
        last = sample(&agent.scrape(), name, labels);
        last == Some(want)
    });
    assert!(
        ok,
        "{name}{labels:?} stayed at {last:?}, expected {want}\n{}",
        agent.log()
    );
}

/// Asserts a configuration failure as operators must see it: exit 2,
/// nothing on stdout, and exactly one stderr line, `agent: invalid
/// configuration: ...`, naming every needle, without panic or backtrace
/// text. Returns that line.
pub fn assert_config_error(
    what: &str,
    (code, stdout, stderr): (i32, String, String),
    needles: &[&str],
) -> String {
    assert_eq!(code, 2, "{what}: exit code; stderr:\n{stderr}");
    assert_eq!(stdout, "", "{what}: stdout");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line:\n{stderr}");
    assert!(stderr.ends_with('\n'), "{what}: {stderr:?}");
    assert!(
        stderr.starts_with("agent: invalid configuration: "),
        "{what}: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} not named in: {stderr}"
        );
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{what}: {bad} in: {stderr}");
    }
    stderr
}
