//! Section 4 of docs/reliability.md. Redis outages under load: errors come
//! fast, and the agent recovers without a restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// One storage request of a load peer.
#[derive(Clone, Copy)]
pub(crate) struct Op {
    started: Instant,
    took: Duration,
    ok: bool,
}

/// Peers sending storage requests back to back until stopped.
pub(crate) struct RedisLoad {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<Op>>>,
    /// (successes, errors) per peer so far.
    progress: Vec<Arc<(AtomicU64, AtomicU64)>>,
}

impl RedisLoad {
    pub(crate) fn start(addr: SocketAddr, peers: usize) -> RedisLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut progress = Vec::new();
        for t in 0..peers {
            let stop = Arc::clone(&stop);
            let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
            progress.push(Arc::clone(&counts));
            let mut peer = Peer::connect(addr);
            handles.push(std::thread::spawn(move || {
                let mut ops = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("r{t}-{}", n % 32);
                    let line = match n % 4 {
                        0 | 1 => format!(r#"{{"id":{n},"op":"put","key":"{key}","value":"{n}"}}"#),
                        2 => format!(r#"{{"id":{n},"op":"get","key":"{key}"}}"#),
                        _ => format!(r#"{{"id":{n},"op":"delete","key":"{key}"}}"#),
                    };
                    let started = Instant::now();
                    let (reply, took) = peer.timed_request(&line);
                    let ok = if reply.starts_with(&format!(r#"{{"id":{n},"ok":true"#)) {
                        true
                    } else if reply
                        .starts_with(&format!(r#"{{"id":{n},"ok":false,"error":"storage "#))
                    {
                        false
                    } else {
                        panic!("unexpected reply to {line}: {reply}");
                    };
                    let counter = if ok { &counts.0 } else { &counts.1 };
                    counter.fetch_add(1, Ordering::Relaxed);
                    ops.push(Op { started, took, ok });
                    n += 1;
                }
                ops
            }));
        }
        RedisLoad {
            stop,
            handles,
            progress,
        }
    }

    pub(crate) fn counts(&self) -> Vec<(u64, u64)> {
        self.progress
            .iter()
            .map(|c| (c.0.load(Ordering::Relaxed), c.1.load(Ordering::Relaxed)))
            .collect()
    }

    /// Waits until every peer has `more` further successes (`ok`) or errors.
    pub(crate) fn wait_each(&self, ok: bool, more: u64) {
        let base = self.counts();
        let pick = |c: &(u64, u64)| if ok { c.0 } else { c.1 };
        let done = wait_until(|| {
            self.counts()
                .iter()
                .zip(&base)
                .all(|(now, then)| pick(now) >= pick(then) + more)
        });
        assert!(
            done,
            "peers did not see {more} more {} (counts {:?}, before {base:?})",
            if ok { "successes" } else { "errors" },
            self.counts()
        );
    }

    pub(crate) fn finish(self) -> Vec<Vec<Op>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("load peer failed"))
            .collect()
    }
}

pub(crate) fn redis_sum(text: &str, name: &str) -> f64 {
    ["get", "put", "delete"]
        .iter()
        .map(|op| value(text, name, &[("operation", op), ("backend", "redis")]))
        .sum()
}

/// Checks the counters against what the peers saw, and that no storage
/// operation outlasted the timeout by more than scheduling slack (the 1 s
/// bucket holds every operation).
pub(crate) fn assert_redis_counts(agent: &Agent, ops: &[Vec<Op>]) -> (u64, u64) {
    let all: Vec<&Op> = ops.iter().flatten().collect();
    let errors = all.iter().filter(|o| !o.ok).count() as u64;
    let total = all.len() as u64;
    let text = agent.scrape();
    assert_eq!(redis_sum(&text, "storage_operations_total"), total as f64);
    assert_eq!(
        redis_sum(&text, "storage_operation_errors_total"),
        errors as f64
    );
    assert_eq!(
        value(&text, "messages_failed_total", &[("reason", "storage")]),
        errors as f64
    );
    assert_eq!(value(&text, "messages_received_total", &[]), total as f64);
    for op in ["get", "put", "delete"] {
        let labels = [("operation", op), ("backend", "redis")];
        let mut with_le = labels.to_vec();
        with_le.push(("le", "1"));
        assert_eq!(
            value(&text, "storage_operation_duration_seconds_bucket", &with_le),
            value(&text, "storage_operation_duration_seconds_count", &labels),
            "a Redis {op} took over 1 s"
        );
    }
    (total, errors)
}

/// What the peers saw in one outage, from `down` (Redis gone) to `back`
/// (bringing it back began): (sorted error latencies, how long after `up`
/// (Redis answering again) the slowest peer succeeded again).
pub(crate) fn outage_figures(
    ops: &[Vec<Op>],
    down: Instant,
    back: Instant,
    up: Instant,
) -> (Vec<Duration>, Duration) {
    let inside = |o: &&Op| o.started >= down && o.started + o.took <= back;
    assert!(
        ops.iter().flatten().filter(inside).all(|o| !o.ok),
        "a request succeeded while Redis was unavailable"
    );
    let mut errors: Vec<Duration> = ops
        .iter()
        .flatten()
        .filter(|o| !o.ok && o.started + o.took >= down && o.started < up)
        .map(|o| o.took)
        .collect();
    errors.sort();
    assert!(!errors.is_empty(), "no errors during the outage");
    let recovery = ops
        .iter()
        .map(|peer| {
            peer.iter()
                .find(|o| o.ok && o.started + o.took > back)
                .map(|o| (o.started + o.took).saturating_duration_since(up))
                .expect("a success after Redis came back")
        })
        .max()
        .unwrap();
    (errors, recovery)
}

#[test]
fn redis_outage_under_load_fails_fast_and_recovers_without_restart() {
    const PEERS: usize = 4;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let agent = start(redis_options(&redis));
    let load = RedisLoad::start(agent.peer_addr, PEERS);
    load.wait_each(true, 50);

    // 1. redis-server killed: error replies, counted, while /metrics stays up.
    redis.stop();
    let down = Instant::now();
    load.wait_each(false, 10);
    let errors_then = redis_sum(&agent.scrape(), "storage_operation_errors_total");
    load.wait_each(false, 10);
    let errors_now = redis_sum(&agent.scrape(), "storage_operation_errors_total");
    assert!(
        errors_now > errors_then && errors_then > 0.0,
        "storage_operation_errors_total {errors_then} then {errors_now}"
    );
    assert_eq!(agent.http_get("/health").status, 200);
    let back = Instant::now();
    redis.restart();
    let up = Instant::now();
    load.wait_each(true, 50);

    // 2. redis-server hung (SIGSTOP): requests are cut off at the timeout.
    let pid = redis.pid() as i32;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let hung = Instant::now();
    load.wait_each(false, 4);
    let errors_hung = redis_sum(&agent.scrape(), "storage_operation_errors_total");
    assert!(errors_hung > errors_now);
    let cont = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = Instant::now();
    load.wait_each(true, 50);
    let ops = load.finish();

    let (down_errors, down_recovery) = outage_figures(&ops, down, back, up);
    let (hung_errors, hung_recovery) = outage_figures(&ops, hung, cont, resumed);
    let (total, errors) = assert_redis_counts(&agent, &ops);
    println!(
        "[redis] {PEERS} peers sending back to back, {total} storage requests, {errors} error replies in all; \
         /metrics and /health up throughout (storage.redis.timeout {} ms)",
        REDIS_TIMEOUT.as_millis()
    );
    for (what, errs, recovery, secs) in [
        ("killed", &down_errors, down_recovery, back - down),
        ("hung (SIGSTOP)", &hung_errors, hung_recovery, cont - hung),
    ] {
        println!(
            "[redis] redis-server {what} for {:.1} s: {} error replies, latency p50 {:.1} ms, \
             max {:.1} ms; every peer succeeding again {:.0} ms after it was back",
            secs.as_secs_f64(),
            errs.len(),
            ms(percentile(errs, 0.5)),
            ms(*errs.last().unwrap()),
            ms(recovery)
        );
    }
    let slowest = *down_errors.last().unwrap().max(hung_errors.last().unwrap());
    assert!(
        slowest <= REDIS_TIMEOUT + Duration::from_millis(500),
        "an error reply took {slowest:?}"
    );
    assert!(
        percentile(&hung_errors, 0.5) >= REDIS_TIMEOUT,
        "a hung Redis should be cut off by the timeout"
    );
    assert_no_panic(&agent);
}

#[test]
fn redis_down_at_startup_under_load_recovers_when_it_appears() {
    const PEERS: usize = 4;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    redis.stop();
    let agent = start(redis_options(&redis));
    assert!(
        agent.log().contains("Redis is unreachable"),
        "no warning:\n{}",
        agent.log()
    );
    let load = RedisLoad::start(agent.peer_addr, PEERS);
    load.wait_each(false, 20);
    assert!(redis_sum(&agent.scrape(), "storage_operation_errors_total") > 0.0);
    let restart = Instant::now();
    redis.restart();
    let up = Instant::now();
    load.wait_each(true, 50);
    let ops = load.finish();
    assert!(ops
        .iter()
        .flatten()
        .filter(|o| o.started + o.took <= restart)
        .all(|o| !o.ok));
    let slowest_error = ops
        .iter()
        .flatten()
        .filter(|o| !o.ok)
        .map(|o| o.took)
        .max()
        .unwrap();
    let recovery = ops
        .iter()
        .map(|peer| {
            let o = peer.iter().find(|o| o.ok).expect("a success");
            (o.started + o.took).saturating_duration_since(up)
        })
        .max()
        .unwrap();
    let (total, errors) = assert_redis_counts(&agent, &ops);
    println!(
        "[redis] started with Redis down: warned; {PEERS} peers, {total} requests, {errors} errors, \
         slowest error {:.1} ms; every peer succeeding {:.0} ms after redis-server came up",
        ms(slowest_error),
        ms(recovery)
    );
    assert!(slowest_error <= REDIS_TIMEOUT + Duration::from_millis(500));
    assert_no_panic(&agent);
}
