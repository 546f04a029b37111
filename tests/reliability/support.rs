//! What the sections share: open-files limits, /proc figures, a
//! deterministic PRNG, a monitoring peer, pipelined requests, many
//! connections opened at once, and the storage-fault helpers of sections 8
//! to 12.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;

/// The open-files limits of this test process, set once before any agent
/// starts: the soft limit is lowered below the hard one (when there is room)
/// so that every agent inherits a soft limit it has to raise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FdLimits {
    /// The soft limit agents inherit.
    pub(crate) soft: u64,
    pub(crate) hard: u64,
}

pub(crate) fn fd_limits() -> FdLimits {
    static LIMITS: OnceLock<FdLimits> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        // Unlimited reads as u64::MAX, as RLIM_INFINITY is.
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        // This process needs a few thousand descriptors (test 1 alone holds
        // 3,000 sockets); keep three quarters of the hard limit.
        let lowered = hard / 4 * 3;
        let soft = if lowered >= 6000 { lowered } else { hard };
        let lim = Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        };
        setrlimit(Resource::Nofile, lim).expect("setrlimit");
        FdLimits { soft, hard }
    })
}

/// Starts an agent after fixing this process's open-files limits.
pub(crate) fn start(opts: AgentOptions) -> Agent {
    fd_limits();
    Agent::start_with(opts)
}

pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/pid/fd")
        .count()
}

/// Accepted TCP connections on local `port` that process `pid` holds open:
/// its socket descriptors matched by inode against `/proc/<pid>/net/tcp`
/// and `tcp6`, the listening socket left out. Sockets that open or close
/// between the two reads are missed, never counted twice, so a maximum of
/// samples never exceeds what the process held.
pub(crate) fn connections_on_port(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/pid/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut held = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // sl local_address rem_address st ... inode: the local port is the
        // hex after the colon, state 0A is LISTEN, the inode is field 9.
        for fields in text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && fields[3] != "0A" && inodes.contains(fields[9]) {
                held += 1;
            }
        }
    }
    held
}

/// "Max open files" soft and hard limits of a process.
pub(crate) fn max_open_files(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/pid/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

pub(crate) fn assert_no_panic(agent: &Agent) {
    let log = agent.log();
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A small deterministic PRNG (xorshift64*), so garbage is reproducible.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A well-behaved peer pinging in the background; it fails the test if a
/// reply is wrong and records how long the slowest one took.
pub(crate) struct Monitor {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, Duration)>,
}

impl Monitor {
    pub(crate) fn start(addr: SocketAddr) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let mut peer = Peer::connect(addr);
        let handle = std::thread::spawn(move || {
            let (mut n, mut slowest) = (0u64, Duration::ZERO);
            while !flag.load(Ordering::Relaxed) {
                let (reply, took) = peer.timed_request(&format!(r#"{{"id":"m{n}","op":"ping"}}"#));
                assert_eq!(reply, format!(r#"{{"id":"m{n}","ok":true}}"#));
                n += 1;
                slowest = slowest.max(took);
                std::thread::sleep(Duration::from_millis(5));
            }
            (n, slowest)
        });
        Monitor { stop, handle }
    }

    /// Stops it: (requests answered, slowest reply).
    pub(crate) fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("monitor peer failed")
    }
}

/// Sends `requests` (one per line) on one connection from a writer thread
/// while reading the replies; returns them in order.
pub(crate) fn pipelined(addr: SocketAddr, requests: &[String]) -> Vec<String> {
    pipelined_counting(addr, requests, &AtomicU64::new(0))
}

/// [`pipelined`], adding 1 to `progress` for each reply read.
pub(crate) fn pipelined_counting(
    addr: SocketAddr,
    requests: &[String],
    progress: &AtomicU64,
) -> Vec<String> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = Vec::with_capacity(requests.iter().map(|r| r.len() + 1).sum());
    for r in requests {
        bytes.extend_from_slice(r.as_bytes());
        bytes.push(b'\n');
    }
    let mut writer = stream.try_clone().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || writer.write_all(&bytes).expect("write requests"));
        let mut reader = BufReader::new(&stream);
        (0..requests.len())
            .map(|i| {
                let mut line = String::new();
                let n = reader.read_line(&mut line).expect("read reply");
                assert!(
                    n > 0 && line.ends_with('\n'),
                    "reply {i} cut short: {line:?}"
                );
                line.pop();
                progress.fetch_add(1, Ordering::Relaxed);
                line
            })
            .collect()
    })
}

pub(crate) const LOCAL: [(&str, &str); 1] = [("backend", "local")];

/// An agent whose database is `db` (outside its own directory).
pub(crate) fn agent_on(db: &std::path::Path) -> Agent {
    start(AgentOptions::default().env("AGENT_STORAGE__LOCAL__PATH", db.display()))
}

/// Polls `/ready` until it answers `status`; returns how long that took and
/// the body.
pub(crate) fn wait_ready_status(agent: &Agent, status: u16) -> (Duration, String) {
    let start = Instant::now();
    let mut last = None;
    let ok = wait_until(|| {
        let resp = agent.http_get("/ready");
        let hit = resp.status == status;
        last = Some(resp);
        hit
    });
    assert!(
        ok,
        "/ready never answered {status}: {last:?}\n{}",
        agent.log()
    );
    (start.elapsed(), last.unwrap().body)
}

/// Lines of the agent's log that contain `needle`.
pub(crate) fn log_lines(agent: &Agent, needle: &str) -> usize {
    agent.log().lines().filter(|l| l.contains(needle)).count()
}

/// Asserts the agent logged `needle` exactly `n` times (n > 0), once the
/// lines have come through the pipe the test reads its output from.
pub(crate) fn assert_logged(agent: &Agent, needle: &str, n: usize) {
    wait_until(|| log_lines(agent, needle) >= n);
    let got = log_lines(agent, needle);
    assert_eq!(got, n, "{needle:?} logged {got} times:\n{}", agent.log());
}

/// A value the test can recognise: which key, and padding to `len` bytes.
pub(crate) fn recognisable(key: &str, len: usize) -> String {
    let mut v = format!("{key}=");
    while v.len() < len {
        v.push('.');
    }
    v
}

/// Puts `key` until a put succeeds, once every 10 ms; returns how long it
/// took and how many puts failed first.
pub(crate) fn put_until_ok(peer: &mut Peer, key: &str, value: &str) -> (Duration, u64) {
    let start = Instant::now();
    let mut failures = 0;
    let ok = wait_until(|| {
        if peer.put(key, value)["ok"] == true {
            return true;
        }
        failures += 1;
        std::thread::sleep(Duration::from_millis(10));
        false
    });
    assert!(ok, "puts never succeeded again");
    (start.elapsed(), failures)
}

/// Waits for every task on `rt` and returns their results, panicking with
/// the first task's error (and `context`, e.g. the agent's log, if given).
pub(crate) fn join_all<T, E: std::fmt::Display>(
    rt: &tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<Result<T, E>>>,
    context: &str,
) -> Vec<T> {
    tasks
        .into_iter()
        .map(|t| {
            rt.block_on(t)
                .expect("task")
                .unwrap_or_else(|e| panic!("{e}{context}"))
        })
        .collect()
}

/// A runtime of the test's own for the sections that hold hundreds or
/// thousands of connections open at once.
pub(crate) fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Opens many connections at most 64 handshakes at a time: an unbounded
/// burst of thousands can overflow the agent's listen backlog on a loaded
/// machine, which would test the kernel's SYN handling, not the agent.
/// Clones share the limit.
#[derive(Clone)]
pub(crate) struct Handshakes(Arc<tokio::sync::Semaphore>);

impl Handshakes {
    pub(crate) fn new() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(64)))
    }

    /// Connects `socket` to `addr` within [`WAIT`]; `what` names the
    /// connection in the error.
    pub(crate) async fn connect(
        &self,
        socket: tokio::net::TcpSocket,
        addr: SocketAddr,
        what: &str,
    ) -> Result<tokio::net::TcpStream, String> {
        let _turn = self.0.acquire().await.expect("never closed");
        tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .map_err(|_| format!("{what}: connect timed out"))?
            .map_err(|e| format!("{what}: connect: {e}"))
    }

    /// [`Handshakes::connect`] with a socket of default options.
    pub(crate) async fn open(
        &self,
        addr: SocketAddr,
        what: &str,
    ) -> Result<tokio::net::TcpStream, String> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let socket = socket.map_err(|e| format!("{what}: socket: {e}"))?;
        self.connect(socket, addr, what).await
    }
}
