//! Section 14 of docs/reliability.md. Memory stays bounded with 400 peers and
//! 1 MiB messages, and returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// Samples `f` every 20 ms until the agent's message count has not moved
/// for `quiet` (it has done all it can with what it was sent), keeping the
/// largest VmRSS seen; returns it.
pub(crate) fn peak_rss_until_quiet(agent: &Agent, quiet: Duration) -> u64 {
    let pid = agent.pid();
    let mut peak = vm_rss_bytes(pid);
    let mut last = None;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + 2 * WAIT;
    loop {
        peak = peak.max(vm_rss_bytes(pid));
        let received = sample(&agent.scrape(), "messages_received_total", &[]);
        if received != last {
            last = received;
            still_since = Instant::now();
        } else if still_since.elapsed() >= quiet {
            return peak.max(vm_rss_bytes(pid));
        }
        assert!(Instant::now() < deadline, "the agent never settled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Issue #15, item 2: each connection kept a buffer as large as the largest
/// line it had seen (100 idle peers that had each sent a 1 MiB put cost
/// +118.7 MiB), replies waiting for peers that did not read them had no
/// global bound (400 peers with 50 unread 1 MiB gets each: +1,244 MiB), and
/// much of it stayed after they closed. Now buffers shrink back after a
/// large message, memory beyond the fixed 64 KiB buffers comes from one
/// budget (`network.max_buffered_bytes`, 64 MiB by default), and large
/// blocks go back to the OS when freed.
#[test]
fn memory_stays_bounded_with_400_peers_and_1_mib_messages_and_returns_after() {
    const PEERS: usize = 400;
    const GETS: usize = 50;
    const BUDGET: u64 = 64 << 20;
    const FIXED: u64 = 64 << 10;
    // Growth allowed while the gets wait: the budget, the three fixed
    // 64 KiB buffers of every connection (read, write, line), and 16 MiB
    // for the runtime, tasks and allocator.
    const GETS_BOUND: u64 = BUDGET + PEERS as u64 * 3 * FIXED + (16 << 20);
    // While the puts run: the same, except that each put in flight (the
    // budget admits about 68 at a time) is also copied by the storage
    // layer, into its queue and into the database's pages, until it is
    // committed: up to three times the budget.
    const PUTS_BOUND: u64 = 3 * BUDGET + PEERS as u64 * 3 * FIXED + (16 << 20);
    // After the large messages, idle connections hold their fixed buffers
    // at most.
    const IDLE_BOUND: u64 = PEERS as u64 * 3 * FIXED + (16 << 20);
    // Once they have all closed.
    const AFTER_BOUND: u64 = 16 << 20;
    let agent = start(AgentOptions::default());
    let pid = agent.pid();
    // Values as large as a request may carry: the put line is 1 MiB exactly.
    let prefix = r#"{"op":"put","key":"big","value":""}"#;
    let big = "x".repeat(1024 * 1024 - prefix.len());
    let put = format!(r#"{{"op":"put","key":"big","value":"{big}"}}"#);
    assert_eq!(put.len(), 1024 * 1024);
    let get_reply = format!(r#"{{"ok":true,"value":"{big}"}}"#);
    // Warm up with one connection: the value is in the database (and its
    // cache) before the baseline is taken.
    {
        let mut peer = agent.connect();
        assert_eq!(peer.request(&put), r#"{"ok":true}"#);
        assert_eq!(peer.request(r#"{"op":"get","key":"big"}"#), get_reply);
    }
    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);
    let baseline = vm_rss_bytes(pid);

    let rt = client_runtime();
    let addr = agent.peer_addr;
    // 400 peers connect (64 handshakes at a time, through `Handshakes`),
    // and the agent has them all before any sends: this is about memory,
    // not about a listen backlog overflowing on a loaded machine.
    let handshakes = Handshakes::new();
    let connected: Vec<_> = (0..PEERS)
        .map(|i| {
            let handshakes = handshakes.clone();
            rt.spawn(async move {
                let socket =
                    tokio::net::TcpSocket::new_v4().map_err(|e| format!("peer {i}: {e}"))?;
                // A small receive buffer: unread replies back up in the
                // agent soon, not in this process's kernel buffers.
                socket
                    .set_recv_buffer_size(4096)
                    .map_err(|e| format!("peer {i}: {e}"))?;
                handshakes.connect(socket, addr, &format!("peer {i}")).await
            })
        })
        .collect();
    let connected: Vec<tokio::net::TcpStream> = join_all(&rt, connected, "");
    wait_for_value(&agent, "agent_peers_connected", &[], PEERS as f64);
    // Each sends a 1 MiB put at once and reads its reply.
    let put = Arc::new(put);
    let puts_started = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let put = Arc::clone(&put);
            rt.spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
                s.write_all(put.as_bytes())
                    .await
                    .map_err(|e| format!("peer {i}: sending its put: {e}"))?;
                s.write_all(b"\n")
                    .await
                    .map_err(|e| format!("peer {i}: sending its put: {e}"))?;
                let mut reply = String::new();
                let mut reader = tokio::io::BufReader::new(&mut s);
                tokio::time::timeout(2 * WAIT, reader.read_line(&mut reply))
                    .await
                    .map_err(|_| format!("peer {i}: no reply to its put"))?
                    .map_err(|e| format!("peer {i}: reading its put's reply: {e}"))?;
                if reply != "{\"ok\":true}\n" {
                    return Err(format!("peer {i}: put reply {reply:.80}"));
                }
                Ok(s)
            })
        })
        .collect();
    let mut peak_puts = baseline;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak_puts = peak_puts.max(vm_rss_bytes(pid));
        assert!(puts_started.elapsed() < 4 * WAIT, "puts did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let puts_time = puts_started.elapsed();
    let mut streams: Vec<tokio::net::TcpStream> =
        join_all(&rt, tasks, &format!("\n{}", agent.log()));
    // Settled: the 400 stay connected, idle, their large message behind them.
    peak_rss_until_quiet(&agent, Duration::from_millis(500));
    let idle_after_puts = vm_rss_bytes(pid);

    // Each pipelines 50 gets of the 1 MiB value and reads nothing.
    let gets: Vec<u8> = r#"{"op":"get","key":"big"}"#
        .bytes()
        .chain(std::iter::once(b'\n'))
        .cycle()
        .take(GETS * (r#"{"op":"get","key":"big"}"#.len() + 1))
        .collect();
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        for s in &mut streams {
            s.write_all(&gets).await.expect("send gets");
        }
    });
    // Until the agent has done all it can: every connection either waits
    // for its peer to read, or for its turn at the budget.
    let gets_sent = Instant::now();
    let peak_gets = peak_rss_until_quiet(&agent, Duration::from_secs(1));
    let gets_settled = gets_sent.elapsed();
    let received_while_stuck = value(&agent.scrape(), "messages_received_total", &[]);

    // All but one close. The last one then reads its 50 replies: every one
    // is the value, whole (the budget held replies back, it lost none).
    let mut last = streams.pop().unwrap();
    let closing = Instant::now();
    drop(streams);
    wait_for_value(&agent, "agent_peers_connected", &[], 1.0);
    let noticed_close = closing.elapsed();
    let reading = Instant::now();
    let drained = rt.block_on(async {
        use tokio::io::AsyncBufReadExt;
        let mut reader = tokio::io::BufReader::new(&mut last);
        let mut line = String::new();
        for i in 0..GETS {
            line.clear();
            tokio::time::timeout(WAIT, reader.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("reply {i} never came"))
                .expect("read reply");
            assert!(
                line.trim_end() == get_reply,
                "reply {i}: {} bytes",
                line.len()
            );
        }
        GETS
    });
    let read_time = reading.elapsed();
    drop(last);
    drop(rt);
    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);
    let mut after = vm_rss_bytes(pid);
    let settled = wait_until(|| {
        after = vm_rss_bytes(pid);
        after <= baseline + AFTER_BOUND
    });

    let growth = |rss: u64| rss.saturating_sub(baseline);
    println!(
        "[memory] baseline {:.1} MiB; {PEERS} peers' 1 MiB puts (all answered in {:.1} s): peak +{:.1} MiB \
         (bound +{:.0} MiB), then idle +{:.1} MiB ({:.0} KiB per peer; bound +{:.0} MiB)",
        mib(baseline),
        puts_time.as_secs_f64(),
        mib(growth(peak_puts)),
        mib(PUTS_BOUND),
        mib(growth(idle_after_puts)),
        growth(idle_after_puts) as f64 / 1024.0 / PEERS as f64,
        mib(IDLE_BOUND)
    );
    println!(
        "[memory] {GETS} unread 1 MiB gets pipelined by each: peak +{:.1} MiB (bound +{:.0} MiB); the agent \
         settled after {:.1} s with {received_while_stuck} messages read",
        mib(growth(peak_gets)),
        mib(GETS_BOUND),
        gets_settled.as_secs_f64()
    );
    println!(
        "[memory] 399 closed: the agent noticed in {:.2} s; the last peer then read its {drained} replies, \
         all whole, in {:.1} s; after all closed +{:.1} MiB (bound +{:.0} MiB)",
        noticed_close.as_secs_f64(),
        read_time.as_secs_f64(),
        mib(growth(after)),
        mib(AFTER_BOUND)
    );
    assert!(
        growth(peak_puts) < PUTS_BOUND,
        "puts: +{:.1} MiB",
        mib(growth(peak_puts))
    );
    assert!(
        growth(idle_after_puts) < IDLE_BOUND,
        "idle: +{:.1} MiB",
        mib(growth(idle_after_puts))
    );
    assert!(
        growth(peak_gets) < GETS_BOUND,
        "gets: +{:.1} MiB",
        mib(growth(peak_gets))
    );
    assert!(
        settled,
        "VmRSS stayed at +{:.1} MiB after all peers closed",
        mib(growth(after))
    );
    assert_no_panic(&agent);
}

/// Issue #28, item 5: redb's page cache was 1 GiB with no setting, so a
/// large database took a healthy idle agent over the `HighMemory` alert.
/// `storage.local.cache_size` bounds it: with an 8 MiB cache, writing and
/// then reading back 80 MiB of values grows the agent by about the cache,
/// not the data.
#[test]
fn a_database_larger_than_its_cache_does_not_grow_the_agent_with_it() {
    const CACHE: u64 = 8 << 20;
    const VALUE: usize = 512 << 10;
    const VALUES: usize = 160;
    let agent = start(AgentOptions::default().env("AGENT_STORAGE__LOCAL__CACHE_SIZE", CACHE));
    let before = vm_rss_bytes(agent.pid());
    let mut peer = agent.connect();
    for i in 0..VALUES {
        // Distinct values, so no page is shared between them.
        let value = format!("{i:06}").repeat(VALUE / 6);
        assert_eq!(peer.put(&format!("big{i}"), &value)["ok"], true);
    }
    for _ in 0..2 {
        for i in 0..VALUES {
            let reply = peer.get(&format!("big{i}"));
            assert_eq!(reply["value"].as_str().map(str::len), Some(VALUE / 6 * 6));
        }
    }
    drop(peer);
    let after = peak_rss_until_quiet(&agent, Duration::from_millis(500));
    let data = (VALUES * VALUE) as u64;
    let grown = after.saturating_sub(before);
    eprintln!(
        "cache {:.0} MiB, data {:.0} MiB: RSS {:.1} -> {:.1} MiB (+{:.1})",
        mib(CACHE),
        mib(data),
        mib(before),
        mib(after),
        mib(grown)
    );
    // The cache, one value's line and reply buffers, and the allocator's
    // slack; a tenth of the data would already break it.
    assert!(
        grown < CACHE + (24 << 20),
        "RSS grew by {:.1} MiB with an {:.0} MiB cache",
        mib(grown),
        mib(CACHE)
    );
}
