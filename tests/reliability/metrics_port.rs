//! Section 1 of docs/reliability.md. Metrics port abuse: thousands of idle or
//! half-sent connections are capped and closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// Outcome of one abusive metrics connection.
pub(crate) struct Abuse {
    half_sent: bool,
    /// From the connection being established to the server closing it.
    closed_after: Duration,
    /// Bytes the server sent before closing.
    bytes: usize,
}

#[test]
fn metrics_port_abuse_is_capped_and_closed_within_30s() {
    const CONNECTIONS: usize = 3000;
    const MAX_METRICS_CONNECTIONS: usize = 64;
    const CLOSE_BOUND: Duration = Duration::from_secs(30);
    const PATH: &str = "/agent-metrics";
    let limits = fd_limits();
    let agent = start(
        AgentOptions::default()
            .env("AGENT_METRICS__PATH", PATH)
            .env("AGENT_METRICS__MAX_CONNECTIONS", MAX_METRICS_CONNECTIONS),
    );
    let pid = agent.pid();

    // The soft open-files limit was raised to the hard one, and logged.
    let (soft, hard) = max_open_files(pid);
    assert_eq!(soft, hard, "soft open-files limit not raised");
    assert_eq!(hard, limits.hard);
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("open-files limit"))
        .unwrap_or_else(|| panic!("no open-files limit line:\n{log}"));
    assert!(
        line.contains(&format!("soft_before={}", limits.soft))
            && line.contains(&format!("soft={hard}"))
            && line.contains(&format!("hard={hard}")),
        "{line}"
    );
    println!(
        "[abuse] RLIMIT_NOFILE: inherited soft {}, agent soft {soft}, hard {hard}",
        limits.soft
    );

    let base_fds = open_fds(pid);
    let addr = agent.metrics_addr;
    let rt = client_runtime();
    let opened = Arc::new(AtomicU64::new(0));
    let handshakes = Handshakes::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let (opened, handshakes) = (Arc::clone(&opened), handshakes.clone());
            rt.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = handshakes.open(addr, &format!("connection {i}")).await?;
                let opened_at = Instant::now();
                let half_sent = i % 2 == 1;
                if half_sent {
                    // Half an HTTP request: the request line and one header,
                    // never the blank line that ends the head.
                    let _ = s
                        .write_all(b"GET /agent-metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                        .await;
                }
                opened.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                let mut bytes = 0;
                loop {
                    let read = tokio::time::timeout_at(
                        (opened_at + 2 * CLOSE_BOUND).into(),
                        s.read(&mut buf),
                    )
                    .await
                    .map_err(|_| {
                        format!("connection {i} still open after {:?}", 2 * CLOSE_BOUND)
                    })?;
                    match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => bytes += n,
                    }
                }
                Ok::<_, String>(Abuse {
                    half_sent,
                    closed_after: opened_at.elapsed(),
                    bytes,
                })
            })
        })
        .collect();

    // While the connections open and sit there: the agent's descriptors stay
    // bounded and peers are served.
    let mut max_fds = base_fds;
    let mut max_held = 0;
    let mut peer_latencies = Vec::new();
    let sample_fds = |max_fds: &mut usize, max_held: &mut usize| {
        *max_held = (*max_held).max(connections_on_port(pid, addr.port()));
        *max_fds = (*max_fds).max(open_fds(pid));
    };
    let serve_a_peer = |latencies: &mut Vec<Duration>| {
        let t = Instant::now();
        let mut peer = agent.connect();
        let n = latencies.len();
        assert_eq!(
            peer.request(&format!(r#"{{"id":{n},"op":"ping"}}"#)),
            format!(r#"{{"id":{n},"ok":true}}"#)
        );
        latencies.push(t.elapsed());
    };
    let deadline = Instant::now() + WAIT;
    while opened.load(Ordering::Relaxed) < CONNECTIONS as u64 {
        assert!(
            Instant::now() < deadline,
            "opened only {} connections in {WAIT:?}",
            opened.load(Ordering::Relaxed)
        );
        sample_fds(&mut max_fds, &mut max_held);
        serve_a_peer(&mut peer_latencies);
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_time = started.elapsed();
    sample_fds(&mut max_fds, &mut max_held);

    // All 3,000 are open on our side: a normal scrape, /health and a 404.
    let scrape_started = Instant::now();
    let resp = agent.http_get(PATH);
    let scrape_time = scrape_started.elapsed();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.body.contains("agent_build_info"),
        "not metrics: {resp:?}"
    );
    let health = agent.http_get("/health");
    assert_eq!((health.status, health.body.as_str()), (200, "OK\n"));
    for path in ["/metrics", "/", "/agent-metrics/x", "/healthz"] {
        assert_eq!(agent.http_get(path).status, 404, "{path}");
    }

    // Until the server has closed every one of them.
    while !tasks.iter().all(|t| t.is_finished()) {
        assert!(
            started.elapsed() < 3 * CLOSE_BOUND,
            "abusive connections still open"
        );
        sample_fds(&mut max_fds, &mut max_held);
        serve_a_peer(&mut peer_latencies);
        std::thread::sleep(Duration::from_millis(50));
    }
    let results: Vec<Abuse> = join_all(&rt, tasks, "");
    drop(rt);

    let (idle, half): (Vec<&Abuse>, Vec<&Abuse>) = results.iter().partition(|a| !a.half_sent);
    let slowest = |v: &[&Abuse]| v.iter().map(|a| a.closed_after).max().unwrap();
    // Closed before the header-read timeout could have fired: evicted at
    // the cap by newer connections.
    let evicted = results
        .iter()
        .filter(|a| a.closed_after < Duration::from_secs(9))
        .count();
    for a in &results {
        assert!(
            a.closed_after <= CLOSE_BOUND,
            "a metrics connection (half sent: {}) stayed open {:?}",
            a.half_sent,
            a.closed_after
        );
    }
    let answered = results.iter().filter(|a| a.bytes > 0).count();
    // Concurrent metrics connections are capped, and so are the sockets
    // behind them: the open ones and as many again on their way out.
    assert!(
        max_held <= 2 * MAX_METRICS_CONNECTIONS,
        "agent held {max_held} metrics connections (cap {MAX_METRICS_CONNECTIONS})"
    );
    // All descriptors: far from the 3,000 offered.
    let fd_bound = base_fds + 4 * MAX_METRICS_CONNECTIONS;
    assert!(
        max_fds <= fd_bound,
        "agent held {max_fds} descriptors (baseline {base_fds}, bound {fd_bound})"
    );
    assert!(
        wait_until(|| open_fds(pid) <= base_fds + 2),
        "descriptors did not return to the baseline {base_fds}: {}",
        open_fds(pid)
    );
    peer_latencies.sort();
    println!(
        "[abuse] {CONNECTIONS} metrics connections ({} idle, {} half-sent) opened in {:.1} s; \
         agent fds: baseline {base_fds}, max {max_fds}; metrics connections held: max {max_held} (cap {MAX_METRICS_CONNECTIONS})",
        idle.len(),
        half.len(),
        open_time.as_secs_f64()
    );
    println!(
        "[abuse] closed by the server: {evicted} evicted at the cap, {} by the 10 s header-read timeout; \
         slowest idle {:.2} s, slowest half-sent {:.2} s (bound {} s); {answered} got response bytes",
        CONNECTIONS - evicted,
        slowest(&idle).as_secs_f64(),
        slowest(&half).as_secs_f64(),
        CLOSE_BOUND.as_secs()
    );
    println!(
        "[abuse] scrape under abuse {:.1} ms; {} peer connect+ping round trips, p50 {:.1} ms, max {:.1} ms",
        ms(scrape_time),
        peer_latencies.len(),
        ms(percentile(&peer_latencies, 0.5)),
        ms(*peer_latencies.last().unwrap())
    );
    assert_no_panic(&agent);
}
