//! Section 3 of docs/reliability.md. Exact counts with many pipelining peers
//! and connection churn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// Request `i` of concurrency peer `t`, and the reply prefix it must get.
pub(crate) fn mixed_request(t: usize, i: usize) -> (String, String, Option<&'static str>) {
    let key = format!("c{t}-{}", i % 64);
    match i % 8 {
        0..=2 => (
            format!(r#"{{"id":{i},"op":"put","key":"{key}","value":"{t}:{i}"}}"#),
            format!(r#"{{"id":{i},"ok":true}}"#),
            Some("put"),
        ),
        3 | 4 => (
            format!(r#"{{"id":{i},"op":"get","key":"{key}"}}"#),
            format!(r#"{{"id":{i},"ok":true,"value":"#),
            Some("get"),
        ),
        5 => (
            format!(r#"{{"id":{i},"op":"delete","key":"{key}"}}"#),
            format!(r#"{{"id":{i},"ok":true,"deleted":"#),
            Some("delete"),
        ),
        6 => (
            format!(r#"{{"id":{i},"op":"ping"}}"#),
            format!(r#"{{"id":{i},"ok":true}}"#),
            None,
        ),
        _ if i % 16 == 7 => (
            format!(r#"{{"id":{i},"op":"warp"}}"#),
            format!(r#"{{"id":{i},"ok":false,"error":"unknown op"#),
            Some("unknown_op"),
        ),
        _ => (
            format!(r#"{{"id":{i},"op":"get","key":""}}"#),
            format!(r#"{{"id":{i},"ok":false,"error":"#),
            Some("invalid"),
        ),
    }
}

#[test]
fn counts_are_exact_with_32_pipelining_peers_and_connection_churn() {
    const PEERS: usize = 32;
    const MESSAGES: usize = 2000;
    const CHURN: usize = 500;
    let agent = start(AgentOptions::default());
    let addr = agent.peer_addr;

    let mut want: HashMap<&'static str, u64> = HashMap::new();
    for t in 0..PEERS {
        for i in 0..MESSAGES {
            if let Some(kind) = mixed_request(t, i).2 {
                *want.entry(kind).or_default() += 1;
            }
        }
    }
    // Churn: every fourth connection sends a ping and reads its reply
    // before leaving; half of all connections leave with a reset.
    let churn_pings = (0..CHURN).filter(|i| i % 4 == 0).count() as u64;

    let started = Instant::now();
    let barrier = Barrier::new(PEERS + 1);
    let replied = AtomicU64::new(0);
    let replied = &replied;
    let churn_time = std::thread::scope(|s| {
        for t in 0..PEERS {
            let barrier = &barrier;
            s.spawn(move || {
                let requests: Vec<(String, String, Option<&str>)> =
                    (0..MESSAGES).map(|i| mixed_request(t, i)).collect();
                let lines: Vec<String> = requests.iter().map(|r| r.0.clone()).collect();
                barrier.wait();
                let replies = pipelined_counting(addr, &lines, replied);
                for (i, (reply, (_, prefix, _))) in replies.iter().zip(&requests).enumerate() {
                    assert!(
                        reply.starts_with(prefix.as_str()),
                        "peer {t} reply {i}: {reply} (expected {prefix}...)"
                    );
                }
            });
        }
        let churn = s.spawn(|| {
            barrier.wait();
            let t = Instant::now();
            // Spread over the peers' run: connection i waits for its share
            // of their replies.
            let step = (PEERS * MESSAGES / (CHURN + CHURN / 4)) as u64;
            for i in 0..CHURN {
                let deadline = Instant::now() + WAIT;
                while replied.load(Ordering::Relaxed) < i as u64 * step {
                    assert!(Instant::now() < deadline, "peers stalled");
                    std::thread::sleep(Duration::from_micros(500));
                }
                let mut peer = Peer::connect(addr);
                if i % 4 == 0 {
                    assert_eq!(
                        peer.request(&format!(r#"{{"id":"churn{i}","op":"ping"}}"#)),
                        format!(r#"{{"id":"churn{i}","ok":true}}"#)
                    );
                }
                if i % 2 == 0 {
                    peer.reset();
                } else {
                    drop(peer);
                }
            }
            (t.elapsed(), replied.load(Ordering::Relaxed))
        });
        churn.join().unwrap()
    });
    let (churn_time, replied_when_churn_done) = churn_time;
    assert!(
        replied_when_churn_done < (PEERS * MESSAGES) as u64,
        "the churn did not overlap the peers"
    );
    let elapsed = started.elapsed();

    wait_for_value(&agent, "agent_peers_connected", &[], 0.0);
    let total = (PEERS * MESSAGES) as u64 + churn_pings;
    let text = agent.scrape();
    assert_eq!(value(&text, "messages_received_total", &[]), total as f64);
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        total as f64
    );
    for op in ["put", "get", "delete"] {
        let labels = [("operation", op), ("backend", "local")];
        let n = want[op] as f64;
        assert_eq!(value(&text, "storage_operations_total", &labels), n, "{op}");
        assert_eq!(
            value(&text, "storage_operation_duration_seconds_count", &labels),
            n,
            "{op}"
        );
        assert_eq!(
            value(&text, "storage_operation_errors_total", &labels),
            0.0,
            "{op}"
        );
    }
    for reason in ["unknown_op", "invalid"] {
        assert_eq!(
            value(&text, "messages_failed_total", &[("reason", reason)]),
            want[reason] as f64,
            "{reason}"
        );
    }
    for reason in ["parse", "too_large", "storage"] {
        assert_eq!(
            value(&text, "messages_failed_total", &[("reason", reason)]),
            0.0
        );
    }
    assert_eq!(value(&text, "agent_connections_rejected_total", &[]), 0.0);
    println!(
        "[concurrency] {PEERS} peers x {MESSAGES} pipelined messages + {CHURN} churned connections \
         ({} reset, {churn_pings} with a ping) in {:.1} s (churn over the first {:.1} s, {:.0} msg/s); \
         counted exactly: received {total}, put {}, get {}, delete {}, unknown_op {}, invalid {}; \
         agent_peers_connected back to 0",
        CHURN / 2,
        elapsed.as_secs_f64(),
        churn_time.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        want["put"],
        want["get"],
        want["delete"],
        want["unknown_op"],
        want["invalid"],
    );
    assert_no_panic(&agent);
}
