//! Load generator: saturates an agent with pipelined requests from many
//! peers and reports throughput and latency.
//!
//! ```text
//! cargo run --release --example loadgen -- --addr 127.0.0.1:7070 \
//!     --peers 16 --messages 200000 --mix get=75,put=20,delete=5
//! ```
//!
//! Each peer keeps up to `--depth` requests in flight on its connection.
//! Latency is from writing a request to reading its reply, so at saturation
//! it includes queueing, as a real peer would see it. `--preload` first puts
//! every key once so that gets hit. Output is one line per figure, plus a
//! final `RESULT` line that scripts parse.
//!
//! `--connected-file F --go-file G`: once every peer is connected and has
//! had a ping answered, create F, then wait until G exists before sending
//! the load. benches/callgrind.sh counts instructions between the two, so
//! connection setup (per connection, not per message) stays out of the
//! per-message figure.
//!
//! `--tls-dir D`: speak mutual TLS, with `D/ca.pem`, `D/client.pem` and
//! `D/client-key.pem`, verifying the agent as `localhost`.
//! `--make-certs D` writes those files, plus `D/server.pem` and
//! `D/server-key.pem` for the agent (for `localhost` and 127.0.0.1), and
//! exits: benches/callgrind.sh `--compare tls` uses them to measure what
//! TLS costs per message.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio_rustls::rustls;

#[derive(Debug, Clone)]
struct Args {
    addr: SocketAddr,
    peers: usize,
    messages: usize,
    mix: Mix,
    keys: usize,
    depth: usize,
    value_bytes: usize,
    preload: bool,
    connected_file: Option<PathBuf>,
    go_file: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Either half of a plain or TLS connection.
type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Percentages of get, put and delete.
#[derive(Debug, Clone, Copy)]
struct Mix {
    get: u32,
    put: u32,
    delete: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen --addr HOST:PORT [--peers 16] [--messages 200000] \
         [--mix get=75,put=20,delete=5] [--keys 10000] [--depth 64] [--value-bytes 32] [--preload] \
         [--connected-file PATH --go-file PATH] [--tls-dir DIR] | --make-certs DIR"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: "127.0.0.1:7070".parse().unwrap_or_else(|_| usage()),
        peers: 16,
        messages: 200_000,
        mix: Mix {
            get: 75,
            put: 20,
            delete: 5,
        },
        keys: 10_000,
        depth: 64,
        value_bytes: 32,
        preload: false,
        connected_file: None,
        go_file: None,
        tls: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--preload" {
            args.preload = true;
            continue;
        }
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => args.addr = value.parse().unwrap_or_else(|_| usage()),
            "--peers" => args.peers = value.parse().unwrap_or_else(|_| usage()),
            "--messages" => args.messages = value.parse().unwrap_or_else(|_| usage()),
            "--keys" => args.keys = value.parse().unwrap_or_else(|_| usage()),
            "--depth" => args.depth = value.parse().unwrap_or_else(|_| usage()),
            "--value-bytes" => args.value_bytes = value.parse().unwrap_or_else(|_| usage()),
            "--mix" => args.mix = parse_mix(&value).unwrap_or_else(|| usage()),
            "--connected-file" => args.connected_file = Some(value.into()),
            "--go-file" => args.go_file = Some(value.into()),
            "--tls-dir" => args.tls = Some(client_tls(std::path::Path::new(&value))),
            "--make-certs" => {
                make_certs(std::path::Path::new(&value));
                std::process::exit(0);
            }
            _ => usage(),
        }
    }
    if args.peers == 0
        || args.depth == 0
        || args.keys == 0
        || args.connected_file.is_some() != args.go_file.is_some()
    {
        usage();
    }
    args
}

fn parse_mix(s: &str) -> Option<Mix> {
    let mut mix = Mix {
        get: 0,
        put: 0,
        delete: 0,
    };
    for part in s.split(',') {
        let (op, pct) = part.split_once('=')?;
        let pct: u32 = pct.parse().ok()?;
        match op {
            "get" => mix.get = pct,
            "put" => mix.put = pct,
            "delete" => mix.delete = pct,
            _ => return None,
        }
    }
    (mix.get + mix.put + mix.delete == 100).then_some(mix)
}

/// xorshift: cheap, deterministic per peer, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn request(line: &mut String, rng: &mut Rng, args: &Args, seq: u64, value: &str) {
    use std::fmt::Write;
    line.clear();
    let key = rng.next() % args.keys as u64;
    let roll = (rng.next() % 100) as u32;
    let _ = if roll < args.mix.get {
        writeln!(line, "{{\"id\":{seq},\"op\":\"get\",\"key\":\"k{key}\"}}")
    } else if roll < args.mix.get + args.mix.put {
        writeln!(
            line,
            "{{\"id\":{seq},\"op\":\"put\",\"key\":\"k{key}\",\"value\":\"{value}\"}}"
        )
    } else {
        writeln!(
            line,
            "{{\"id\":{seq},\"op\":\"delete\",\"key\":\"k{key}\"}}"
        )
    };
}

#[derive(Default)]
struct PeerResult {
    latencies_us: Vec<u32>,
    errors: u64,
}

/// A connected peer whose first ping has been answered, so the agent has
/// set up its side of the connection.
async fn connect(args: &Args) -> std::io::Result<(Reader, Writer)> {
    let stream = TcpStream::connect(args.addr).await?;
    stream.set_nodelay(true)?;
    let (r, mut w): (Box<dyn AsyncRead + Send + Unpin>, Writer) = match &args.tls {
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(name, stream)
                .await?;
            let (r, w) = tokio::io::split(tls);
            (Box::new(r), Box::new(w))
        }
    };
    let mut reader = BufReader::new(r);
    w.write_all(b"{\"op\":\"ping\"}\n").await?;
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::other("agent closed the connection"));
    }
    Ok((reader, w))
}

async fn run_peer(
    peer: usize,
    count: usize,
    args: Arc<Args>,
    preload: bool,
    (mut reader, w): (Reader, Writer),
) -> std::io::Result<PeerResult> {
    let mut writer = BufWriter::new(w);
    let window = Arc::new(Semaphore::new(args.depth));
    let sent_at: Arc<Mutex<VecDeque<Instant>>> =
        Arc::new(Mutex::new(VecDeque::with_capacity(args.depth)));
    let value = "v".repeat(args.value_bytes);

    let writer_task = {
        let (window, sent_at, args) =
            (Arc::clone(&window), Arc::clone(&sent_at), Arc::clone(&args));
        tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (peer as u64 + 1));
            let mut line = String::with_capacity(128);
            for seq in 0..count as u64 {
                let permit = window.acquire().await.map_err(std::io::Error::other)?;
                permit.forget();
                if preload {
                    line.clear();
                    line.push_str(&format!(
                        "{{\"id\":{seq},\"op\":\"put\",\"key\":\"k{}\",\"value\":\"{value}\"}}\n",
                        seq as usize * args.peers + peer
                    ));
                } else {
                    request(&mut line, &mut rng, &args, seq, &value);
                }
                sent_at.lock().await.push_back(Instant::now());
                writer.write_all(line.as_bytes()).await?;
                // Flush when the window is full or we are done, so requests travel in batches.
                if window.available_permits() == 0 || seq + 1 == count as u64 {
                    writer.flush().await?;
                }
            }
            writer.flush().await?;
            Ok::<_, std::io::Error>(writer)
        })
    };

    let mut result = PeerResult {
        latencies_us: Vec::with_capacity(count),
        errors: 0,
    };
    let mut line = String::new();
    for _ in 0..count {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("agent closed the connection"));
        }
        let sent = sent_at.lock().await.pop_front();
        if let Some(sent) = sent {
            result
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        if !line.contains("\"ok\":true") {
            result.errors += 1;
        }
        window.add_permits(1);
    }
    let _writer = writer_task.await.map_err(std::io::Error::other)??;
    Ok(result)
}

async fn run_phase(
    args: &Arc<Args>,
    total: usize,
    preload: bool,
) -> std::io::Result<(Duration, PeerResult)> {
    let per_peer = total.div_ceil(args.peers);
    let mut connections = Vec::with_capacity(args.peers);
    for _ in 0..args.peers {
        connections.push(connect(args).await?);
    }
    if let (Some(connected), Some(go), false) = (&args.connected_file, &args.go_file, preload) {
        std::fs::write(connected, b"")?;
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let start = Instant::now();
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(p, c)| tokio::spawn(run_peer(p, per_peer, Arc::clone(args), preload, c)))
        .collect();
    let mut all = PeerResult::default();
    for t in tasks {
        let r = t.await.map_err(std::io::Error::other)??;
        all.latencies_us.extend(r.latencies_us);
        all.errors += r.errors;
    }
    Ok((start.elapsed(), all))
}

/// A client configuration from `dir`'s ca.pem, client.pem, client-key.pem.
fn client_tls(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("loadgen: {what} in {}: {e}", dir.display());
        std::process::exit(2)
    };
    let certs = |name: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(dir.join(name))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| fail(name, &e))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs("ca.pem") {
        roots.add(cert).unwrap_or_else(|e| fail("ca.pem", &e));
    }
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem"))
        .unwrap_or_else(|e| fail("client-key.pem", &e));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_root_certificates(roots)
            .with_client_auth_cert(certs("client.pem"), key)
    })
    .unwrap_or_else(|e| fail("client config", &e));
    Arc::new(config)
}

/// Writes a CA and a server and a client certificate into `dir`.
fn make_certs(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        for name in ["server", "client"] {
            let mut params =
                CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!(
            "loadgen: cannot write certificates to {}: {e}",
            dir.display()
        );
        std::process::exit(1);
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = Arc::new(parse_args());
    if args.preload {
        let keys = args.keys;
        match run_phase(&args, keys, true).await {
            Ok((elapsed, r)) => eprintln!(
                "preloaded {keys} keys in {elapsed:.2?} ({} errors)",
                r.errors
            ),
            Err(e) => {
                eprintln!("loadgen: preload failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let (elapsed, mut result) = match run_phase(&args, args.messages, false).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    result.latencies_us.sort_unstable();
    let n = result.latencies_us.len();
    let rate = n as f64 / elapsed.as_secs_f64();
    let p50 = percentile(&result.latencies_us, 0.50);
    let p99 = percentile(&result.latencies_us, 0.99);
    println!("messages:   {n}");
    println!("errors:     {}", result.errors);
    println!("elapsed:    {:.3} s", elapsed.as_secs_f64());
    println!("throughput: {rate:.0} messages/s");
    println!("latency:    p50 {p50} us, p99 {p99} us");
    println!(
        "RESULT messages={n} errors={} seconds={:.6} rate={rate:.1} p50_us={p50} p99_us={p99}",
        result.errors,
        elapsed.as_secs_f64()
    );
}
