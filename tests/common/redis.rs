//! A real `redis-server` on a free port, raw RESP commands to it, and
//! agents that store in it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, require_bin, wait_until, Agent, AgentOptions, WAIT};

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

    /// The server's process id (to pause it with SIGSTOP, for example).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("redis-server running")
    }

    /// Pauses the server (SIGSTOP): it keeps its connections open but
    /// answers nothing, so only the agent's timeout ends each command.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0, "kill");
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

/// Options for an agent storing in `server`, with a 500 ms Redis timeout.
pub fn redis_options(server: &RedisServer) -> AgentOptions {
    AgentOptions::default()
        .env("AGENT_STORAGE__BACKEND", "redis")
        .env("AGENT_STORAGE__REDIS__URL", server.url())
        .env("AGENT_STORAGE__REDIS__TIMEOUT", "500ms")
}

/// Starts an agent storing in `server`, with `extra` settings on top.
pub fn redis_agent(server: &RedisServer, extra: &[(&str, &str)]) -> Agent {
    let mut opts = redis_options(server);
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    Agent::start_with(opts)
}
