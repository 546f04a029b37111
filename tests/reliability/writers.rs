//! Sections 5 and 6 of docs/reliability.md. Writers under `kill -9` (no
//! acknowledged put is lost) and under SIGTERM (the agent answers what it
//! read, exits 0 in time and loses nothing).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

pub(crate) fn put_key(t: usize, seq: u64) -> String {
    format!("w{t}-{seq}")
}

pub(crate) fn put_value(t: usize, seq: u64) -> String {
    format!(
        "value {t}/{seq}/{}",
        seq.wrapping_mul(0x9e37_79b9) % 1_000_003
    )
}

/// How a writer's reply stream ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    Eof,
    Reset,
    /// A reply line cut short after this many bytes.
    Truncated(usize),
}

/// One peer pipelining puts of unique keys (at most `WINDOW` unanswered)
/// from a writer thread, with a reader thread checking every reply.
///
/// A slow one writes without a window, alternately a get of the value of
/// `big` and a put (odd ids), starts reading only when `go` is set and then
/// pauses after each reply: megabytes of replies wait in the agent's socket
/// while more requests arrive, like a peer on a slow link.
pub(crate) struct Writer {
    written: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Option<StreamEnd>>>,
}

pub(crate) const WINDOW: u64 = 128;

impl Writer {
    pub(crate) fn start(addr: SocketAddr, t: usize, total_acked: Arc<AtomicU64>) -> Writer {
        Self::start_with(addr, t, total_acked, None)
    }

    /// A slow reader, pausing `pause` after each reply.
    pub(crate) fn slow(
        addr: SocketAddr,
        t: usize,
        big: Arc<String>,
        pause: Duration,
        go: Arc<AtomicBool>,
    ) -> Writer {
        Self::start_with(addr, t, Arc::new(AtomicU64::new(0)), Some((big, pause, go)))
    }

    pub(crate) fn start_with(
        addr: SocketAddr,
        t: usize,
        total_acked: Arc<AtomicU64>,
        slow: Option<(Arc<String>, Duration, Arc<AtomicBool>)>,
    ) -> Writer {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let (written, acked, stop) = (written.clone(), acked.clone(), stop.clone());
            let slow = slow.is_some();
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if !slow && seq - acked.load(Ordering::Relaxed) >= WINDOW {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    let line = if slow && seq.is_multiple_of(2) {
                        format!("{{\"id\":{seq},\"op\":\"get\",\"key\":\"big\"}}\n")
                    } else {
                        format!(
                            "{{\"id\":{seq},\"op\":\"put\",\"key\":\"{}\",\"value\":\"{}\"}}\n",
                            put_key(t, seq),
                            put_value(t, seq)
                        )
                    };
                    if stream.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    seq += 1;
                    written.store(seq, Ordering::Relaxed);
                    if slow && seq.is_multiple_of(50) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                None
            })
        };
        let reader = {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                if let Some((_, _, go)) = &slow {
                    let deadline = Instant::now() + WAIT;
                    while !go.load(Ordering::Relaxed) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                let end = loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break StreamEnd::Eof,
                        Ok(_) if line.last() != Some(&b'\n') => {
                            break StreamEnd::Truncated(line.len())
                        }
                        Ok(_) => {
                            let seq = acked.load(Ordering::Relaxed);
                            let want = match &slow {
                                Some((big, _, _)) if seq % 2 == 0 => {
                                    format!("{{\"id\":{seq},\"ok\":true,\"value\":\"{big}\"}}\n")
                                }
                                _ => format!("{{\"id\":{seq},\"ok\":true}}\n"),
                            };
                            assert!(
                                line == want.as_bytes(),
                                "writer {t}: reply {seq} is {:.80}",
                                String::from_utf8_lossy(&line)
                            );
                            acked.store(seq + 1, Ordering::Relaxed);
                            total_acked.fetch_add(1, Ordering::Relaxed);
                            if let Some((_, pause, _)) = &slow {
                                std::thread::sleep(*pause);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => break StreamEnd::Reset,
                        Err(e) => panic!("writer {t}: reading replies: {e}"),
                    }
                };
                // The agent is done with us: stop writing and close.
                stop.store(true, Ordering::Relaxed);
                Some(end)
            })
        };
        Writer {
            written,
            acked,
            threads: vec![writer, reader],
        }
    }

    /// Waits for both threads: (requests written, replies, how it ended).
    pub(crate) fn finish(self) -> (u64, u64, StreamEnd) {
        let ends: Vec<Option<StreamEnd>> = self
            .threads
            .into_iter()
            .map(|h| h.join().expect("writer thread failed"))
            .collect();
        let end = ends.into_iter().flatten().next().expect("reader result");
        (
            self.written.load(Ordering::Relaxed),
            self.acked.load(Ordering::Relaxed),
            end,
        )
    }
}

/// Reads back keys 0..=written of each writer after a restart: every
/// acknowledged put must be there with its value; returns how many
/// unacknowledged ones were found, each with exactly its value. `t0` is
/// the first writer's number; slow writers put at odd ids only.
pub(crate) fn read_back(
    agent: &Agent,
    results: &[(u64, u64, StreamEnd)],
    t0: usize,
    slow: bool,
) -> u64 {
    let mut unacked_present = 0;
    for (i, (written, acked, _)) in results.iter().enumerate() {
        let t = t0 + i;
        let seqs: Vec<u64> = (0..=*written).filter(|s| !slow || s % 2 == 1).collect();
        let requests: Vec<String> = seqs
            .iter()
            .map(|&seq| format!(r#"{{"op":"get","key":"{}"}}"#, put_key(t, seq)))
            .collect();
        let replies = pipelined(agent.peer_addr, &requests);
        for (&seq, reply) in seqs.iter().zip(&replies) {
            let want = format!(
                r#"{{"ok":true,"value":{}}}"#,
                serde_json::Value::String(put_value(t, seq))
            );
            if seq < *acked {
                assert_eq!(reply, &want, "acknowledged put {t}/{seq} lost or changed");
            } else if reply == &want {
                unacked_present += 1;
            } else {
                assert_eq!(reply, r#"{"ok":true,"value":null}"#, "put {t}/{seq}");
            }
        }
    }
    unacked_present
}

pub(crate) fn wait_for_acks(total: &AtomicU64, n: u64) {
    let deadline = Instant::now() + 2 * WAIT;
    while total.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} puts acknowledged",
            total.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn acknowledged_puts_survive_kill_9_under_concurrent_writers() {
    const WRITERS: usize = 8;
    const ACKED: u64 = 5000;
    let mut agent = start(AgentOptions::default());
    let dir = Arc::clone(&agent.dir);
    let total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<Writer> = (0..WRITERS)
        .map(|t| Writer::start(agent.peer_addr, t, Arc::clone(&total)))
        .collect();
    wait_for_acks(&total, ACKED);
    // Right away, with more puts in flight on every connection.
    agent.kill9();
    let elapsed = started.elapsed();
    let results: Vec<(u64, u64, StreamEnd)> = writers.into_iter().map(Writer::finish).collect();
    for (t, (_, _, end)) in results.iter().enumerate() {
        assert!(
            !matches!(end, StreamEnd::Truncated(_)),
            "writer {t}: {end:?}"
        );
    }
    let acked: u64 = results.iter().map(|r| r.1).sum();
    let written: u64 = results.iter().map(|r| r.0).sum();
    assert!(acked >= ACKED);

    let agent = restart_on(&dir);
    let unacked_present = read_back(&agent, &results, 0, false);
    println!(
        "[kill-9] {WRITERS} writers, killed after {acked} acknowledged puts ({:.1} s, {:.0} puts/s), \
         {} written but unanswered: all {acked} acknowledged read back exactly after restart; \
         {unacked_present} unanswered ones were committed too",
        elapsed.as_secs_f64(),
        acked as f64 / elapsed.as_secs_f64(),
        written - acked
    );
    assert_no_panic(&agent);
}

#[test]
fn sigterm_under_load_answers_what_it_read_exits_0_in_time_and_loses_nothing() {
    const WRITERS: usize = 8;
    const BEFORE: u64 = 2000;
    const SLOW: usize = 2;
    /// Slow writer `i` puts the keys of writer `SLOW_T0 + i`.
    const SLOW_T0: usize = 100;
    const BIG: usize = 8 * 1024;
    const SLOW_PAUSE: Duration = Duration::from_millis(1);
    const EXIT_BOUND: Duration = Duration::from_secs(10);
    let mut agent = start(AgentOptions::default());
    let dir = Arc::clone(&agent.dir);
    let total = Arc::new(AtomicU64::new(0));
    let big = Arc::new("b".repeat(BIG));
    assert_eq!(
        agent.connect().put("big", &big),
        serde_json::json!({"ok": true})
    );
    let go = Arc::new(AtomicBool::new(false));
    let slow: Vec<Writer> = (0..SLOW)
        .map(|i| {
            Writer::slow(
                agent.peer_addr,
                SLOW_T0 + i,
                Arc::clone(&big),
                SLOW_PAUSE,
                Arc::clone(&go),
            )
        })
        .collect();
    let writers: Vec<Writer> = (0..WRITERS)
        .map(|t| Writer::start(agent.peer_addr, t, Arc::clone(&total)))
        .collect();
    wait_for_acks(&total, BEFORE);
    let signalled = Instant::now();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    go.store(true, Ordering::Relaxed);
    let status = agent.wait_exit();
    let exit_time = signalled.elapsed();
    let results: Vec<(u64, u64, StreamEnd)> = writers.into_iter().map(Writer::finish).collect();
    let slow: Vec<(u64, u64, StreamEnd)> = slow.into_iter().map(Writer::finish).collect();
    let log = agent.log();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(
        exit_time <= EXIT_BOUND,
        "took {exit_time:?} to exit:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let acked: u64 = results.iter().map(|r| r.1).sum();
    let written: u64 = results.iter().map(|r| r.0).sum();

    // Every acknowledged put is there; a put that was executed was read, so
    // its reply must have arrived too.
    let agent = restart_on(&dir);
    let unacked_present = read_back(&agent, &results, 0, false);
    let slow_unacked_present = read_back(&agent, &slow, SLOW_T0, true);
    println!(
        "[sigterm] SIGTERM after {BEFORE}+ acknowledged puts from {WRITERS} writers: exit code {:?} in \
         {:.2} s (bound {} s); writers: {acked} puts answered, {} written but not answered, \
         {unacked_present} of those committed (must be 0), ends {:?}",
        status.code(),
        exit_time.as_secs_f64(),
        EXIT_BOUND.as_secs(),
        written - acked,
        results.iter().map(|r| &r.2).collect::<Vec<_>>()
    );
    println!(
        "[sigterm] {SLOW} slow readers (gets of a {} KiB value and puts, reading only after the signal): \
         replies {:?}, {slow_unacked_present} unanswered puts committed (must be 0), ends {:?}",
        BIG / 1024,
        slow.iter().map(|r| r.1).collect::<Vec<_>>(),
        slow.iter().map(|r| &r.2).collect::<Vec<_>>()
    );
    // Each connection ends with EOF right after a complete reply.
    for (t, (_, _, end)) in results.iter().enumerate() {
        assert_eq!(end, &StreamEnd::Eof, "writer {t}");
    }
    for (t, (_, replies, end)) in slow.iter().enumerate() {
        assert_eq!(
            end,
            &StreamEnd::Eof,
            "slow reader {t} after {replies} replies"
        );
    }
    assert_eq!(
        (unacked_present, slow_unacked_present),
        (0, 0),
        "puts were executed but their replies never arrived"
    );
    assert_no_panic(&agent);
}
