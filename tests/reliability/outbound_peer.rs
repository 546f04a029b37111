//! Section 15 of docs/reliability.md. A misbehaving outbound peer is
//! redialled with backoff and cannot flood the log.

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// What the fake peer does with the agent's `n`-th connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FakePeer {
    /// Accepts and closes at once.
    Slam,
    /// Answers the ping with a short line of junk: escape sequences, a
    /// carriage return, invalid UTF-8.
    ShortJunk,
    /// Answers the ping with 1 MiB of junk and a newline.
    BigJunk,
    /// Answers the ping correctly, then closes.
    Healthy,
}

/// The fake peer's script, one entry per connection the agent makes; the
/// last one repeats.
pub(crate) const FAKE_SCRIPT: &[FakePeer] = &[
    FakePeer::Slam,
    FakePeer::ShortJunk,
    FakePeer::BigJunk,
    FakePeer::Slam,
    FakePeer::ShortJunk,
    FakePeer::BigJunk,
    FakePeer::Healthy,
    FakePeer::Healthy,
];

pub(crate) const SHORT_JUNK: &[u8] = b"\x1b[2J\x1b[31mFAKE ERROR line\rforged\xff\xfe junk";

/// Serves the agent's connections by the script; returns when each entry
/// has been played, with the time of each accept.
pub(crate) fn fake_peer(listener: std::net::TcpListener) -> Vec<Instant> {
    let mut accepted = Vec::new();
    for behaviour in FAKE_SCRIPT {
        let (stream, _) = listener.accept().expect("accept the agent's connection");
        accepted.push(Instant::now());
        if *behaviour == FakePeer::Slam {
            continue;
        }
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut ping = String::new();
        BufReader::new(&stream)
            .read_line(&mut ping)
            .expect("the agent's ping");
        let ping: serde_json::Value = serde_json::from_str(&ping).expect("ping is JSON");
        let reply = match behaviour {
            FakePeer::ShortJunk => [SHORT_JUNK, b"\n"].concat(),
            FakePeer::BigJunk => {
                let mut junk = b"\x1b[31m".repeat((1 << 20) / 5);
                junk.push(b'\n');
                junk
            }
            _ => format!("{{\"id\":{},\"ok\":true}}\n", ping["id"]).into_bytes(),
        };
        // The agent may close before reading it all (it stops at 1 KiB).
        let _ = writer.write_all(&reply);
        if *behaviour == FakePeer::Healthy {
            // Close once the agent has the reply: it is healthy, then lost.
            let _ = writer.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut &stream, &mut rest);
        }
    }
    accepted
}

/// Issue #15, item 6: a peer that accepts and closes at once was redialled
/// 99 times in 10 s (the backoff restarted on every TCP connect), and one
/// answering with a 1 MiB junk line wrote 100 MB of log with its raw escape
/// sequences. Now the backoff grows until a ping is answered, and peer
/// bytes reach the log only as a short escaped preview, in few lines.
#[test]
fn misbehaving_outbound_peer_is_redialled_with_backoff_and_cannot_flood_the_log() {
    const MAX_BACKOFF: Duration = Duration::from_millis(1600);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || fake_peer(listener));
    let mut agent = start(
        AgentOptions::default()
            .env("AGENT_NETWORK__PEERS", format!("[{fake_addr}]"))
            .env("AGENT_NETWORK__MAX_REDIAL_BACKOFF", "1600ms")
            // The held-back warnings go to debug: show them, to check them too.
            .env("AGENT_LOG__LEVEL", "info,agent::peers=debug"),
    );
    let accepted = fake.join().expect("fake peer");
    let gaps: Vec<Duration> = accepted.windows(2).map(|w| w[1] - w[0]).collect();
    let healthy_at = FAKE_SCRIPT
        .iter()
        .position(|b| *b == FakePeer::Healthy)
        .unwrap();
    // Until a ping is answered, each redial waits at least twice as long as
    // the one before (100 ms, 200 ms, ... up to the cap), although every
    // TCP connect succeeded.
    let mut backoff = Duration::from_millis(100);
    for (i, gap) in gaps[..healthy_at].iter().enumerate() {
        assert!(
            *gap >= backoff,
            "redial {} came after {gap:?}, expected at least {backoff:?} (gaps {gaps:?})",
            i + 1
        );
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    // After the healthy connection, the backoff started over: the next
    // redial comes before the cap could have passed.
    let after_healthy = gaps[healthy_at];
    assert!(
        after_healthy < MAX_BACKOFF,
        "redial after a healthy connection took {after_healthy:?} (gaps {gaps:?})"
    );
    agent.wait_for_log("connected to peer");

    let log = agent.log();
    let peer_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&fake_addr.to_string()))
        .collect();
    let warnings = peer_lines.iter().filter(|l| l.contains(" WARN ")).count();
    // No byte the peer chose reaches the log raw: no escape character, no
    // carriage return, and at most a short preview of the junk.
    assert!(
        !log.contains('\x1b'),
        "raw escape sequence in the log:\n{log}"
    );
    assert!(!log.contains('\r'), "raw carriage return in the log");
    assert!(
        !log.contains("forged") || log.contains(r"\rforged"),
        "{log}"
    );
    let preview_line = peer_lines
        .iter()
        .find(|l| l.contains("unexpected ping reply"))
        .unwrap_or_else(|| panic!("no junk reply logged:\n{log}"));
    assert!(
        preview_line.contains(r"\x1b[2J\x1b[31mFAKE ERROR line\rforged\xff\xfe junk"),
        "{preview_line}"
    );
    assert!(
        peer_lines
            .iter()
            .any(|l| l.contains("ping reply longer than 1024 bytes")),
        "{log}"
    );
    let longest = peer_lines.iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(longest < 1024, "a {longest}-byte log line");
    // One warning for the whole outage (the rest held back to debug level),
    // and one line when the peer answered.
    assert_eq!(warnings, 1, "{}", peer_lines.join("\n"));
    assert_eq!(
        log.matches("INFO agent::peers: connected to peer").count(),
        1,
        "{log}"
    );
    println!(
        "[outbound] redial gaps (ms) before the first answered ping: {:?}; after it: {:.0} ms \
         (cap {} ms); agent log: {} bytes in total, {} lines about the peer, the longest {longest} \
         bytes, {warnings} warning",
        gaps[..healthy_at]
            .iter()
            .map(|g| g.as_millis())
            .collect::<Vec<_>>(),
        ms(after_healthy),
        MAX_BACKOFF.as_millis(),
        log.len(),
        peer_lines.len()
    );
    assert_no_panic(&agent);
}
