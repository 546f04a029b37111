//! Section 2 of docs/reliability.md. Hostile peer input: every kind of bad
//! message, stalled and non-reading peers, connections beyond the limit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// Expected totals, kept by the test as it sends.
#[derive(Default)]
pub(crate) struct Expected {
    received: u64,
    failed: HashMap<&'static str, u64>,
    storage: HashMap<&'static str, u64>,
}

impl Expected {
    pub(crate) fn fail(&mut self, reason: &'static str) {
        self.received += 1;
        *self.failed.entry(reason).or_default() += 1;
    }
    pub(crate) fn ok(&mut self, storage_op: Option<&'static str>) {
        self.received += 1;
        if let Some(op) = storage_op {
            *self.storage.entry(op).or_default() += 1;
        }
    }
}

/// Hand-written bad messages: (line, reason, id echoed in the reply).
pub(crate) fn crafted_bad_lines() -> Vec<(Vec<u8>, &'static str, Option<serde_json::Value>)> {
    use serde_json::json;
    let key = |k: &str| format!(r#"{{"id":9,"op":"get","key":"{k}"}}"#).into_bytes();
    let mut cases: Vec<(Vec<u8>, &'static str, Option<serde_json::Value>)> = vec![
        // Invalid JSON.
        (b"not json".to_vec(), "parse", None),
        (b"{".to_vec(), "parse", None),
        (br#"{"id":1,"op":"ping""#.to_vec(), "parse", None),
        (br#"{"id":1,"op":'ping'}"#.to_vec(), "parse", None),
        (br#"{"id":1,"op":"ping"}}"#.to_vec(), "parse", None),
        (b"\0".to_vec(), "parse", None),
        (b"{\"op\":\"ping\"}\0".to_vec(), "parse", None),
        // Invalid UTF-8, inside and outside strings.
        (b"\xff\xfe\xfd".to_vec(), "parse", None),
        (
            b"{\"op\":\"get\",\"key\":\"\xc0\xaf\"}".to_vec(),
            "parse",
            None,
        ),
        (
            b"{\"op\":\"get\",\"key\":\"\xed\xa0\x80\"}".to_vec(),
            "parse",
            None,
        ),
        (b"{\"op\":\"ping\",\"id\":\"\x80\"}".to_vec(), "parse", None),
        // JSON, but not an object.
        (b"42".to_vec(), "invalid", None),
        (b"null".to_vec(), "invalid", None),
        (b"\"ping\"".to_vec(), "invalid", None),
        (br#"[{"op":"ping"}]"#.to_vec(), "invalid", None),
        (b"[1,\"ping\"]".to_vec(), "invalid", None),
        // Wrong types, missing fields.
        (br#"{"id":2,"op":5}"#.to_vec(), "invalid", Some(json!(2))),
        (br#"{"id":3,"op":null}"#.to_vec(), "invalid", Some(json!(3))),
        (
            br#"{"id":4,"op":["get"]}"#.to_vec(),
            "invalid",
            Some(json!(4)),
        ),
        (
            br#"{"id":5,"op":"get","key":7}"#.to_vec(),
            "invalid",
            Some(json!(5)),
        ),
        (
            br#"{"id":6,"op":"get","key":{"k":1}}"#.to_vec(),
            "invalid",
            Some(json!(6)),
        ),
        (
            br#"{"id":7,"op":"put","key":"k","value":1}"#.to_vec(),
            "invalid",
            Some(json!(7)),
        ),
        (
            br#"{"id":8,"op":"put","key":"k","value":null}"#.to_vec(),
            "invalid",
            Some(json!(8)),
        ),
        (
            br#"{"id":"x","op":"put","key":"k"}"#.to_vec(),
            "invalid",
            Some(json!("x")),
        ),
        (
            br#"{"id":[1],"op":"get"}"#.to_vec(),
            "invalid",
            Some(json!([1])),
        ),
        (br#"{"id":1}"#.to_vec(), "invalid", Some(json!(1))),
        (b"{}".to_vec(), "invalid", None),
        // Unknown ops.
        (
            br#"{"id":10,"op":"fly"}"#.to_vec(),
            "unknown_op",
            Some(json!(10)),
        ),
        (
            br#"{"id":11,"op":""}"#.to_vec(),
            "unknown_op",
            Some(json!(11)),
        ),
        (
            br#"{"id":12,"op":"PING"}"#.to_vec(),
            "unknown_op",
            Some(json!(12)),
        ),
        (
            br#"{"id":13,"op":"get\u0000"}"#.to_vec(),
            "unknown_op",
            Some(json!(13)),
        ),
        (
            br#"{"id":14,"op":"drop table"}"#.to_vec(),
            "unknown_op",
            Some(json!(14)),
        ),
        // Empty keys.
        (key(""), "invalid", Some(json!(9))),
        (
            br#"{"id":15,"op":"put","key":"","value":"v"}"#.to_vec(),
            "invalid",
            Some(json!(15)),
        ),
        (
            br#"{"id":16,"op":"delete","key":""}"#.to_vec(),
            "invalid",
            Some(json!(16)),
        ),
    ];
    // Keys over 1024 bytes, also when under 1024 characters.
    for k in ["k".repeat(1025), "k".repeat(8000), "\u{e9}".repeat(513)] {
        cases.push((key(&k), "invalid", Some(json!(9))));
    }
    cases
}

/// Random bytes with many newlines, NULs, CRs and JSON punctuation; ends
/// with a newline.
pub(crate) fn garbage(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            let r = rng.next();
            match r % 64 {
                0..=3 => b'\n',
                4..=7 => 0,
                8..=9 => b'\r',
                10..=13 => b"{}[]\":,"[(r >> 8) as usize % 7],
                _ => (r >> 16) as u8,
            }
        })
        .collect();
    out.push(b'\n');
    out
}

#[test]
fn hostile_peer_input_is_answered_counted_and_bounded() {
    const MAX_LINE: usize = 16 * 1024;
    const MAX_CONNECTIONS: usize = 8;
    const FLOOD_MAX: u64 = 300_000;
    const RSS_GROWTH_BOUND: u64 = 64 << 20;
    const PROMPT: Duration = Duration::from_secs(2);
    let agent = start(
        AgentOptions::default()
            .env("AGENT_NETWORK__MAX_MESSAGE_BYTES", MAX_LINE)
            .env("AGENT_NETWORK__MAX_CONNECTIONS", MAX_CONNECTIONS),
    );
    let pid = agent.pid();
    let mut expected = Expected::default();
    let monitor = Monitor::start(agent.peer_addr);

    // Hand-written bad messages, one at a time: an error reply each, with
    // the id echoed where the message had a readable one.
    let mut hostile = agent.connect();
    let crafted = crafted_bad_lines();
    for (line, reason, id) in &crafted {
        let mut bytes = line.clone();
        bytes.push(b'\n');
        hostile.send_raw(&bytes);
        let reply = hostile.read_line().expect("agent closed on a bad message");
        let reply: serde_json::Value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"));
        let shown = String::from_utf8_lossy(line);
        assert_eq!(reply["ok"], false, "{shown:.80}: {reply}");
        assert!(reply["error"].is_string(), "{shown:.80}: {reply}");
        assert_eq!(reply.get("id"), id.as_ref(), "{shown:.80}: {reply}");
        expected.fail(reason);
    }
    // The limits themselves are fine: a 1024-byte key works.
    let key = "k".repeat(1024);
    assert_eq!(hostile.put(&key, "edge"), serde_json::json!({"ok": true}));
    assert_eq!(
        hostile.get(&key),
        serde_json::json!({"ok": true, "value": "edge"})
    );
    expected.ok(Some("put"));
    expected.ok(Some("get"));

    // Binary garbage, sent in one go: one error reply per non-blank line.
    let mut rng = Rng(0x5eed_1e55_c0ff_ee11);
    let junk = garbage(&mut rng, 256 * 1024);
    let mut junk_lines = 0u64;
    let mut junk_reasons: HashMap<&'static str, u64> = HashMap::new();
    for segment in junk[..junk.len() - 1].split(|&b| b == b'\n') {
        let line = segment.strip_suffix(b"\r").unwrap_or(segment);
        assert!(line.len() < MAX_LINE);
        if agent::peer::protocol::is_blank(line) {
            continue; // blank lines are skipped without a reply
        }
        let failure = agent::peer::protocol::decode(line)
            .1
            .expect_err("garbage decoded as a request");
        let reason = failure.reason.as_str();
        assert!(reason == "parse" || reason == "invalid", "{reason}");
        expected.fail(reason);
        *junk_reasons.entry(reason).or_default() += 1;
        junk_lines += 1;
    }
    std::thread::scope(|s| {
        let mut w = hostile.writer.try_clone().unwrap();
        let junk = &junk;
        s.spawn(move || w.write_all(junk).expect("send garbage"));
        for i in 0..junk_lines {
            let reply = hostile
                .read_line()
                .unwrap_or_else(|| panic!("closed after {i} garbage replies"));
            assert!(
                reply.starts_with(r#"{"ok":false,"error":"#),
                "garbage reply {i}: {reply}"
            );
        }
    });
    assert_eq!(
        hostile.request(r#"{"id":"after-junk","op":"ping"}"#),
        r#"{"id":"after-junk","ok":true}"#
    );
    expected.ok(None);
    println!(
        "[hostile] {} crafted bad messages and {} bytes of garbage ({junk_lines} lines: {junk_reasons:?}) \
         each answered with an error; connection still usable",
        crafted.len(),
        junk.len()
    );

    // A peer that sends half a line and stalls, for the rest of the test.
    // It completed a request first: at the connection cap, only connections
    // that never did are evicted to make room.
    let mut stalled = agent.connect();
    assert_eq!(
        stalled.request(r#"{"id":"before-stall","op":"ping"}"#),
        r#"{"id":"before-stall","ok":true}"#
    );
    expected.ok(None);
    stalled.send_raw(br#"{"id":"stalled","op":"put","key":"half"#);

    // A peer that pipelines and never reads. Replies to it back up; the
    // agent then stops reading from it, so its memory stays flat however
    // much the peer pushes.
    let big = "b".repeat(1024);
    assert_eq!(hostile.put("big", &big), serde_json::json!({"ok": true}));
    expected.ok(Some("put"));
    let request = |i: u64| match i % 10 {
        0..=4 => format!("{{\"id\":{i},\"op\":\"ping\"}}\n"),
        5..=7 => format!("{{\"id\":{i},\"op\":\"get\",\"key\":\"big\"}}\n"),
        _ => format!("{{\"id\":{i},\"op\":\"teleport\"}}\n"),
    };
    let baseline_rss = vm_rss_bytes(pid);
    let flood_stream = TcpStream::connect(agent.peer_addr).unwrap();
    let pushed = Arc::new(AtomicU64::new(0));
    let stop_flood = Arc::new(AtomicBool::new(false));
    let stalled_since = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let flooder = {
        let mut w = flood_stream.try_clone().unwrap();
        w.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (pushed, stop, stalled_since) =
            (pushed.clone(), stop_flood.clone(), stalled_since.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + 4 * WAIT;
            for i in 0..FLOOD_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let bytes = request(i).into_bytes();
                let mut off = 0;
                while off < bytes.len() {
                    assert!(Instant::now() < deadline, "flood stuck at {i}");
                    match w.write(&bytes[off..]) {
                        Ok(n) => {
                            off += n;
                            *stalled_since.lock().unwrap() = None;
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            stalled_since
                                .lock()
                                .unwrap()
                                .get_or_insert_with(Instant::now);
                        }
                        Err(e) => panic!("flood write: {e}"),
                    }
                }
                pushed.store(i + 1, Ordering::Relaxed);
            }
        })
    };
    // Watch memory until the flood is stuck for a second (back-pressure) or
    // everything was pushed.
    let mut peak_rss = baseline_rss;
    let watch_deadline = Instant::now() + 4 * WAIT;
    loop {
        peak_rss = peak_rss.max(vm_rss_bytes(pid));
        let stuck = stalled_since
            .lock()
            .unwrap()
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
        if stuck || flooder.is_finished() {
            break;
        }
        assert!(
            Instant::now() < watch_deadline,
            "flood neither stuck nor done"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pushed_at_peak = pushed.load(Ordering::Relaxed);
    let back_pressured = !flooder.is_finished();
    peak_rss = peak_rss.max(vm_rss_bytes(pid));
    let growth = peak_rss.saturating_sub(baseline_rss);
    println!(
        "[hostile] non-reading peer pushed {pushed_at_peak} requests{}; agent VmRSS baseline {:.1} MiB, \
         peak {:.1} MiB, growth {:.1} MiB (bound {} MiB)",
        if back_pressured {
            " until the agent stopped reading from it (back-pressure)"
        } else {
            " (all of them)"
        },
        baseline_rss as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        RSS_GROWTH_BOUND >> 20
    );
    assert!(
        back_pressured || pushed_at_peak >= 50_000,
        "only {pushed_at_peak} requests pushed"
    );
    assert!(
        growth < RSS_GROWTH_BOUND,
        "VmRSS grew by {growth} bytes under the flood"
    );
    // Now it stops pushing and reads: every request is answered, in order.
    stop_flood.store(true, Ordering::Relaxed);
    {
        flood_stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut reader = BufReader::new(&flood_stream);
        let mut line = Vec::new();
        let mut i = 0u64;
        let deadline = Instant::now() + 4 * WAIT;
        while !(flooder.is_finished() && i == pushed.load(Ordering::Relaxed)) {
            assert!(Instant::now() < deadline, "flood replies stopped at {i}");
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => panic!("flood connection closed after {i} replies"),
                Ok(_) if line.last() == Some(&b'\n') => {}
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) => panic!("reading flood replies: {e}"),
            }
            let got = String::from_utf8_lossy(&line);
            let ok = match i % 10 {
                0..=4 => got == format!("{{\"id\":{i},\"ok\":true}}\n"),
                5..=7 => got == format!("{{\"id\":{i},\"ok\":true,\"value\":\"{big}\"}}\n"),
                _ => got.starts_with(&format!("{{\"id\":{i},\"ok\":false,\"error\":\"unknown op")),
            };
            assert!(ok, "flood reply {i}: {got:.80}");
            match i % 10 {
                0..=4 => expected.ok(None),
                5..=7 => expected.ok(Some("get")),
                _ => expected.fail("unknown_op"),
            }
            line.clear();
            i += 1;
        }
        println!("[hostile] then it read all {i} replies, in order");
    }
    flooder.join().expect("flooder");
    drop(flood_stream);

    // Lines over max_message_bytes: an error reply, then the connection closes.
    let long_ping = format!(
        "{{\"op\":\"ping\",\"pad\":\"{}\"}}\n",
        "p".repeat(MAX_LINE + 100)
    );
    let endless = vec![b'x'; 3 * MAX_LINE];
    for bytes in [long_ping.as_bytes(), &endless[..]] {
        let mut peer = agent.connect();
        peer.send_raw(bytes);
        let reply = peer.read_line().expect("an error reply before closing");
        assert_eq!(
            reply,
            format!(
                r#"{{"ok":false,"error":"message exceeds network.max_message_bytes ({MAX_LINE} bytes); closing connection"}}"#
            )
        );
        peer.expect_closed();
        expected.fail("too_large");
    }

    // Connections beyond max_connections are closed at once and not served
    // when every open connection has completed a request (one that has not
    // would be evicted instead). Open now: the monitor, the hostile peer,
    // the stalled peer.
    wait_for_value(&agent, "agent_peers_connected", &[], 3.0);
    let mut fillers: Vec<Peer> = (3..MAX_CONNECTIONS)
        .map(|i| {
            let mut filler = agent.connect();
            assert_eq!(
                filler.request(&format!(r#"{{"id":"fill{i}","op":"ping"}}"#)),
                format!(r#"{{"id":"fill{i}","ok":true}}"#)
            );
            expected.ok(None);
            filler
        })
        .collect();
    wait_for_value(&agent, "agent_peers_connected", &[], MAX_CONNECTIONS as f64);
    let mut rejected_after = Vec::new();
    for i in 0..3 {
        let mut extra = agent.connect();
        let _ = extra
            .writer
            .write_all(format!("{{\"id\":\"extra{i}\",\"op\":\"ping\"}}\n").as_bytes());
        rejected_after.push(extra.expect_closed());
    }
    for (i, f) in fillers.iter_mut().enumerate() {
        assert_eq!(
            f.request(&format!(r#"{{"id":{i},"op":"ping"}}"#)),
            format!(r#"{{"id":{i},"ok":true}}"#)
        );
        expected.ok(None);
    }
    drop(fillers);

    // The stalled peer was kept all along: finishing its line gets a reply.
    assert_eq!(
        stalled.request(r#"","value":"v"}"#),
        r#"{"id":"stalled","ok":true}"#
    );
    expected.ok(Some("put"));

    let (monitor_requests, monitor_slowest) = monitor.finish();
    expected.received += monitor_requests;
    println!(
        "[hostile] well-behaved peer: {monitor_requests} pings, slowest reply {:.1} ms (bound {} ms); \
         3 connections over the limit closed after at most {:.1} ms",
        ms(monitor_slowest),
        PROMPT.as_millis(),
        ms(*rejected_after.iter().max().unwrap())
    );
    assert!(
        monitor_slowest < PROMPT,
        "a well-behaved peer waited {monitor_slowest:?}"
    );

    // Every message is counted exactly once, under exactly one reason.
    let text = agent.scrape();
    let mut counted = HashMap::new();
    for reason in ["parse", "invalid", "unknown_op", "too_large", "storage"] {
        let got = value(&text, "messages_failed_total", &[("reason", reason)]);
        let want = expected.failed.get(reason).copied().unwrap_or(0);
        assert_eq!(got, want as f64, "messages_failed_total{{reason={reason}}}");
        counted.insert(reason, got as u64);
    }
    assert_eq!(
        value(&text, "messages_received_total", &[]),
        expected.received as f64
    );
    assert_eq!(
        value(&text, "message_processing_duration_seconds_count", &[]),
        expected.received as f64
    );
    for op in ["get", "put", "delete"] {
        assert_eq!(
            value(
                &text,
                "storage_operations_total",
                &[("operation", op), ("backend", "local")]
            ),
            expected.storage.get(op).copied().unwrap_or(0) as f64,
            "storage_operations_total{{operation={op}}}"
        );
    }
    assert_eq!(value(&text, "agent_connections_rejected_total", &[]), 3.0);
    println!(
        "[hostile] counted exactly: messages_received_total {}, messages_failed_total {counted:?}",
        expected.received
    );
    assert_no_panic(&agent);
}
