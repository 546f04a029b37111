//! Local backend durability with the real binary: acknowledged writes
//! survive a graceful restart (SIGTERM) and a `kill -9`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Writes keys k0..k{n}, overwrites the even ones, deletes every third, and
/// returns what each key must read back as.
fn write_pattern(peer: &mut Peer, prefix: &str, n: usize) -> Vec<(String, Option<String>)> {
    let mut want = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}{i}");
        assert_eq!(
            peer.request(&format!(
                r#"{{"id":{i},"op":"put","key":"{key}","value":"first {i}"}}"#
            )),
            format!(r#"{{"id":{i},"ok":true}}"#)
        );
        let mut value = Some(format!("first {i}"));
        if i % 2 == 0 {
            assert_eq!(
                peer.request(&format!(
                    r#"{{"id":{i},"op":"put","key":"{key}","value":"second {i}"}}"#
                )),
                format!(r#"{{"id":{i},"ok":true}}"#)
            );
            value = Some(format!("second {i}"));
        }
        if i % 3 == 0 {
            assert_eq!(
                peer.request(&format!(r#"{{"id":{i},"op":"delete","key":"{key}"}}"#)),
                format!(r#"{{"id":{i},"ok":true,"deleted":true}}"#)
            );
            value = None;
        }
        want.push((key, value));
    }
    want
}

fn assert_reads(peer: &mut Peer, want: &[(String, Option<String>)]) {
    for (key, value) in want {
        let reply = peer.request(&format!(r#"{{"id":"r","op":"get","key":"{key}"}}"#));
        let expected = match value {
            Some(v) => format!(r#"{{"id":"r","ok":true,"value":"{v}"}}"#),
            None => r#"{"id":"r","ok":true,"value":null}"#.to_string(),
        };
        assert_eq!(reply, expected, "key {key}");
    }
}

#[test]
fn values_survive_a_graceful_restart() {
    let mut agent = Agent::start();
    let dir = Arc::clone(&agent.dir);
    let mut peer = agent.connect();
    let want = write_pattern(&mut peer, "g", 60);
    assert_reads(&mut peer, &want);

    // An idle connection does not hold up the shutdown, and is closed cleanly.
    let start = Instant::now();
    let status = agent.terminate();
    let took = start.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        agent.log()
    );
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?}:\n{}",
        agent.log()
    );
    assert_eq!(
        peer.read_line(),
        None,
        "the agent closes connections at shutdown"
    );
    let log = agent.log();
    assert!(log.contains("agent stopped"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    let agent = restart_on(&dir);
    let mut peer = agent.connect();
    assert_reads(&mut peer, &want);
    // And the store keeps working after the restart.
    assert_eq!(peer.put("g0", "third"), serde_json::json!({"ok": true}));
    assert_eq!(
        peer.get("g0"),
        serde_json::json!({"ok": true, "value": "third"})
    );
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut agent = Agent::start();
    let dir = Arc::clone(&agent.dir);
    let mut peer = agent.connect();
    let want = write_pattern(&mut peer, "k", 60);
    // The last reply has been read: SIGKILL right after the acknowledgement,
    // with no chance to flush anything.
    agent.kill9();

    let mut agent = restart_on(&dir);
    let mut peer = agent.connect();
    assert_reads(&mut peer, &want);

    // Twice in a row, and after writes the restarted agent acknowledged.
    assert_eq!(
        peer.put("after", "restart"),
        serde_json::json!({"ok": true})
    );
    assert_eq!(
        peer.delete("k1"),
        serde_json::json!({"ok": true, "deleted": true})
    );
    agent.kill9();
    let agent = restart_on(&dir);
    let mut peer = agent.connect();
    assert_eq!(
        peer.get("after"),
        serde_json::json!({"ok": true, "value": "restart"})
    );
    assert_eq!(
        peer.get("k1"),
        serde_json::json!({"ok": true, "value": null})
    );
    assert_eq!(
        peer.get("k2"),
        serde_json::json!({"ok": true, "value": "second 2"})
    );
}

#[test]
fn concurrent_acknowledged_writes_survive_kill_9() {
    let mut agent = Agent::start();
    let dir = Arc::clone(&agent.dir);
    let addr = agent.peer_addr;
    // Several peers writing at once share commits; each reply still means
    // the write is on disk.
    let writers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut peer = Peer::connect(addr);
                for i in 0..40 {
                    let reply = peer.request(&format!(
                        r#"{{"id":{i},"op":"put","key":"t{t}-{i}","value":"{t}:{i}"}}"#
                    ));
                    assert_eq!(reply, format!(r#"{{"id":{i},"ok":true}}"#));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    agent.kill9();

    let agent = restart_on(&dir);
    let mut peer = agent.connect();
    for t in 0..4 {
        for i in 0..40 {
            assert_eq!(
                peer.request(&format!(r#"{{"op":"get","key":"t{t}-{i}"}}"#)),
                format!(r#"{{"ok":true,"value":"{t}:{i}"}}"#)
            );
        }
    }
}
