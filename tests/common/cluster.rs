//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes` on
//! free ports, joined by `redis-cli --cluster create`, torn down on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, require_bin, wait_until, WAIT};

/// Masters in the cluster; each gets one replica.
pub const MASTERS: usize = 3;
/// How long a node may not answer before the others mark it failed. Short,
/// so that a failover takes seconds, yet long enough that a loaded CI
/// machine does not fail a node over by mistake.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// One `redis-server` of the cluster.
struct Node {
    port: u16,
    /// The cluster bus port, chosen free too: the default (port + 10000)
    /// may not even exist for a high ephemeral port.
    bus_port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

/// A master, the replica that follows it, and the slots it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: u16,
    pub replica: u16,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Shard {
    /// Whether this shard serves the Redis key `key`.
    pub fn serves(&self, key: &str) -> bool {
        let s = slot(key);
        self.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&s))
    }

    /// Whether this shard holds the agent's key `key`, which the agent
    /// stores as `agent:<key>` (its default `key_prefix`).
    pub fn holds(&self, key: &str) -> bool {
        self.serves(&format!("agent:{key}"))
    }

    /// Agent keys `<prefix>0`, `<prefix>1`, ... that this shard holds.
    pub fn keys(&self, prefix: &str) -> impl Iterator<Item = String> + '_ {
        let prefix = prefix.to_string();
        (0..)
            .map(move |i| format!("{prefix}{i}"))
            .filter(|k| self.holds(k))
    }

    /// The first agent key `<prefix><n>` this shard holds.
    pub fn key(&self, prefix: &str) -> String {
        self.keys(prefix)
            .next()
            .expect("some key falls in every shard")
    }
}

/// Six nodes: three masters with one replica each.
pub struct RedisCluster {
    nodes: Vec<Node>,
    password: Option<String>,
    server: PathBuf,
    cli: PathBuf,
    /// Holds every node's directory (nodes.conf, log).
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts and joins a cluster, and waits until every slot is served and
    /// every replica is in sync. With `password`, every node requires it
    /// (`requirepass`, and `masterauth` for replication). None (with a
    /// printed reason) when redis-server or redis-cli is missing outside CI.
    pub fn start(password: Option<&str>) -> Option<RedisCluster> {
        let mut cluster = Self::reserve(password)?;
        cluster.create();
        Some(cluster)
    }

    /// Chooses the ports but starts nothing: for an agent started before
    /// its cluster exists. [`RedisCluster::create`] starts it later.
    pub fn reserve(password: Option<&str>) -> Option<RedisCluster> {
        let server = require_bin("redis-server")?;
        let cli = require_bin("redis-cli")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = (0..2 * MASTERS)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir_all(&node_dir).expect("node dir");
                Node {
                    port: free_port(),
                    bus_port: free_port(),
                    child: None,
                    dir: node_dir,
                }
            })
            .collect();
        Some(RedisCluster {
            nodes,
            password: password.map(str::to_string),
            server,
            cli,
            dir,
        })
    }

    /// Starts the six servers, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits until the cluster is healthy.
    pub fn create(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_node(i, true);
        }
        let mut cmd = Command::new(&self.cli);
        if let Some(pw) = &self.password {
            cmd.args(["-a", pw, "--no-auth-warning"]);
        }
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn redis-cli --cluster create");
        let deadline = Instant::now() + 2 * WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-cli --cluster create did not finish:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut out);
        }
        assert!(
            status.success() && out.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed ({status}):\n{out}"
        );
        self.wait_healthy();
    }

    /// Starts node `i` and waits until it answers. With `may_move` (before
    /// the cluster is joined), a node that cannot bind its ports (taken
    /// since `free_port` chose them) is started again on fresh ones.
    fn start_node(&mut self, i: usize, may_move: bool) {
        for attempt in 1.. {
            let node = &self.nodes[i];
            let log = std::fs::File::create(node.dir.join("redis.log")).expect("redis log");
            let mut cmd = Command::new(&self.server);
            cmd.args(["--port", &node.port.to_string()])
                .args(["--cluster-port", &node.bus_port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                // A replica's first sync starts at once, not after the
                // default 5 s wait for more replicas.
                .args(["--repl-diskless-sync-delay", "0"]);
            if let Some(pw) = &self.password {
                cmd.args(["--requirepass", pw, "--masterauth", pw]);
            }
            let child = cmd
                .current_dir(&node.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("log fd")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn redis-server");
            self.nodes[i].child = Some(child);
            let port = self.nodes[i].port;
            let mut exited = false;
            let up = wait_until(|| {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return true;
                }
                exited = matches!(
                    self.nodes[i].child.as_mut().map(|c| c.try_wait()),
                    Some(Ok(Some(_)))
                );
                exited
            });
            if up && !exited {
                return;
            }
            let log = self.node_log(i);
            self.nodes[i].child = None;
            if may_move && attempt < 3 && log.contains("Address already in use") {
                self.nodes[i].port = free_port();
                self.nodes[i].bus_port = free_port();
                continue;
            }
            panic!("redis-server on {port} did not start:\n{log}");
        }
    }

    /// Waits until every running node reports `cluster_state:ok`, every
    /// master has an online replica, and every replica has finished its sync.
    pub fn wait_healthy(&self) {
        let mut last = String::new();
        let ok = wait_until(|| {
            let shards = match self.try_shards() {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    return false;
                }
            };
            if shards.len() != MASTERS {
                last = format!("shards: {shards:?}");
                return false;
            }
            for port in self.running_ports() {
                match self.try_command(port, &["CLUSTER", "INFO"]) {
                    Ok(info) if info.contains("cluster_state:ok") => {}
                    Ok(info) => {
                        last = format!("{port}: {info}");
                        return false;
                    }
                    Err(e) => {
                        last = e;
                        return false;
                    }
                }
            }
            shards.iter().all(|s| {
                let replica = self
                    .try_command(s.replica, &["INFO", "replication"])
                    .unwrap_or_default();
                let synced = replica.contains("master_link_status:up")
                    && replica.contains("master_sync_in_progress:0");
                if !synced {
                    last = format!("replica {}: {replica}", s.replica);
                }
                synced
            })
        });
        assert!(
            ok,
            "the cluster did not become healthy: {last}\n{}",
            self.logs()
        );
    }

    /// The ports of the nodes that are running.
    pub fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Seed URLs for the agent (`storage.redis_cluster.nodes`), without the
    /// password: the agent gets it from its password file.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `seed_urls` as the agent's environment takes a list: `[a, b]`.
    pub fn seeds_env(&self) -> String {
        format!("[{}]", self.seed_urls().join(","))
    }

    /// Masters with slots and their replicas, as a running node sees them,
    /// sorted by master port.
    pub fn shards(&self) -> Vec<Shard> {
        self.try_shards()
            .unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"))
    }

    fn try_shards(&self) -> Result<Vec<Shard>, String> {
        let port = *self.running_ports().first().ok_or("no node running")?;
        let text = self.try_command(port, &["CLUSTER", "NODES"])?;
        // <id> <ip:port@bus> <flags> <master id or -> <ping> <pong> <epoch> <link> <slots...>
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 8)
            .collect();
        let port_of = |f: &[&str]| -> Option<u16> {
            f[1].split('@').next()?.rsplit(':').next()?.parse().ok()
        };
        let mut shards = Vec::new();
        for m in rows.iter().filter(|f| {
            let flags = f[2];
            flags.contains("master") && !flags.contains("fail") && f.len() > 8
        }) {
            let replica = rows
                .iter()
                .find(|r| r[3] == m[0] && !r[2].contains("fail"))
                .and_then(|r| port_of(r));
            let slots = m[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| match r.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => r.parse().ok().map(|s| (s, s)),
                })
                .collect();
            if let (Some(master), Some(replica)) = (port_of(m), replica) {
                shards.push(Shard {
                    master,
                    replica,
                    slots,
                });
            }
        }
        shards.sort_by_key(|s| s.master);
        Ok(shards)
    }

    /// Sends one command (after AUTH when the cluster has a password) and
    /// returns the reply: a status, error or integer line (`+OK`, `:3`), or
    /// a bulk string's text.
    pub fn command(&self, port: u16, args: &[&str]) -> String {
        self.try_command(port, args)
            .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
    }

    pub fn try_command(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        if let Some(pw) = &self.password {
            writer
                .write_all(&resp(&["AUTH", pw]))
                .map_err(|e| e.to_string())?;
            let reply = read_reply(&mut reader)?;
            if reply != "+OK" {
                return Err(format!("AUTH: {reply}"));
            }
        }
        writer.write_all(&resp(args)).map_err(|e| e.to_string())?;
        read_reply(&mut reader)
    }

    /// `DBSIZE` of the node on `port`.
    pub fn dbsize(&self, port: u16) -> u64 {
        let reply = self.command(port, &["DBSIZE"]);
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("DBSIZE on {port}: {reply}"))
    }

    /// The replication offset a master has sent, from `INFO replication`.
    pub fn master_offset(&self, port: u16) -> u64 {
        let info = self.command(port, &["INFO", "replication"]);
        info_field(&info, "master_repl_offset")
            .unwrap_or_else(|| panic!("no master_repl_offset on {port}: {info}"))
    }

    /// The offset the replica on `replica` has acknowledged to its master.
    pub fn replica_offset(&self, replica: u16) -> Option<u64> {
        let info = self.try_command(replica, &["INFO", "replication"]).ok()?;
        info_field(&info, "slave_repl_offset")
    }

    /// Whether the node on `port` is a master now.
    pub fn is_master(&self, port: u16) -> bool {
        self.try_command(port, &["INFO", "replication"])
            .is_ok_and(|info| info.contains("role:master"))
    }

    /// SIGKILL: the node gets no chance to hand anything over.
    pub fn kill9(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node on `port` again after [`RedisCluster::kill9`], on the
    /// same ports and with its nodes.conf, so it rejoins the cluster with
    /// the role and slots it had (and no data: nothing is persisted).
    pub fn restart(&mut self, port: u16) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        assert!(self.nodes[i].child.is_none(), "{port} is running");
        self.start_node(i, false);
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the node on `port`.
    pub fn signal(&self, port: u16, signal: i32) {
        let pid = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.child.as_ref())
            .map(|c| c.id())
            .unwrap_or_else(|| panic!("no node running on {port}"));
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("redis.log")).unwrap_or_default()
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| {
                let log = self.node_log(i);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {} ---\n{}\n", self.nodes[i].port, tail.join("\n"))
            })
            .collect()
    }

    /// Where the nodes keep their files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A command in RESP: an array of bulk strings.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply: a line (`+OK`, `-ERR ...`, `:3`), or a bulk string's
/// text (`$-1` for nil).
fn read_reply(reader: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut first = String::new();
    reader.read_line(&mut first).map_err(|e| e.to_string())?;
    let first = first.trim_end().to_string();
    if first.is_empty() {
        return Err("connection closed".into());
    }
    match first.strip_prefix('$').map(str::parse::<i64>) {
        Some(Ok(len)) if len >= 0 => {
            let mut body = vec![0u8; len as usize + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            body.truncate(len as usize);
            String::from_utf8(body).map_err(|e| e.to_string())
        }
        _ => Ok(first),
    }
}

fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The cluster slot of `key` (no hash tags in the test keys): CRC16-XMODEM
/// modulo 16384, as Redis computes it.
pub fn slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in key.as_bytes() {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}
