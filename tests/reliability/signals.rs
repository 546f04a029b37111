//! Section 16 of docs/reliability.md. SIGUSR1, SIGUSR2 and SIGQUIT are logged
//! and ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::common::*;
use crate::support::*;
use crate::writers::{read_back, wait_for_acks, StreamEnd, Writer};

/// Issue #15, item 7: SIGUSR1, SIGUSR2 and SIGQUIT used to kill the agent
/// without a drain, leaving committed puts unanswered. Now each is logged
/// and ignored while writers keep going, and SIGTERM afterwards still
/// drains: every put the agent read is answered.
#[test]
fn sigusr1_sigusr2_and_sigquit_are_logged_and_ignored_under_load() {
    const WRITERS: usize = 4;
    const BETWEEN: u64 = 500;
    let mut agent = start(AgentOptions::default());
    let dir = Arc::clone(&agent.dir);
    let pid = agent.pid() as i32;
    let total = Arc::new(AtomicU64::new(0));
    let writers: Vec<Writer> = (0..WRITERS)
        .map(|t| Writer::start(agent.peer_addr, t, Arc::clone(&total)))
        .collect();
    wait_for_acks(&total, BETWEEN);
    let mut acked_after = Vec::new();
    for (sig, name) in [
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGQUIT, "SIGQUIT"),
    ] {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, sig) };
        agent.wait_for_log(&format!(
            "received {name}; ignored (SIGTERM or SIGINT stops the agent)"
        ));
        // Still serving: the writers' puts keep being answered.
        let now = total.load(Ordering::Relaxed);
        wait_for_acks(&total, now + BETWEEN);
        acked_after.push((name, total.load(Ordering::Relaxed)));
    }
    let status = agent.terminate();
    let log = agent.log();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log.contains("received SIGTERM"), "{log}");
    let results: Vec<(u64, u64, StreamEnd)> = writers.into_iter().map(Writer::finish).collect();
    for (t, (_, _, end)) in results.iter().enumerate() {
        assert_eq!(end, &StreamEnd::Eof, "writer {t}");
    }
    let acked: u64 = results.iter().map(|r| r.1).sum();
    let agent = restart_on(&dir);
    let unacked_present = read_back(&agent, &results, 0, false);
    println!(
        "[signals] acknowledged puts after each ignored signal: {acked_after:?}; SIGTERM then exit \
         code {:?}, {acked} puts answered, {unacked_present} committed but unanswered (must be 0)",
        status.code()
    );
    assert_eq!(unacked_present, 0, "puts were executed but never answered");
    assert_no_panic(&agent);
}
