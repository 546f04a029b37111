//! The Redis backend against a real redis-server: operations and key
//! prefix, prompt errors during an outage, and recovery without restarting
//! the agent. Skipped (with a message) when redis-server is missing, except
//! under CI.

mod common;

use std::time::{Duration, Instant};

use agent::telemetry::defs::MESSAGES_FAILED_TOTAL;
use common::*;

/// Bound on an error reply during an outage: storage.redis.timeout is 500ms.
const PROMPT: Duration = Duration::from_secs(2);

/// Asserts that each storage op fails promptly with a storage error and the
/// id echoed, and that ping (no storage) still works.
fn assert_prompt_storage_errors(peer: &mut Peer) {
    let requests = [
        r#"{"id":1,"op":"put","key":"k","value":"v"}"#,
        r#"{"id":2,"op":"get","key":"k"}"#,
        r#"{"id":3,"op":"delete","key":"k"}"#,
        r#"{"id":4,"op":"put","key":"k","value":"v"}"#,
    ];
    for (i, request) in requests.iter().enumerate() {
        let (reply, took) = peer.timed_request(request);
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["id"], i + 1, "{reply}");
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(
            reply.as_object().unwrap().len(),
            3,
            "id, ok and error only: {reply}"
        );
        let error = reply["error"].as_str().unwrap();
        assert!(
            error.starts_with("storage unavailable: ") || error == "storage timed out after 500ms",
            "{error}"
        );
        assert!(took < PROMPT, "{request} took {took:?}");
    }
    assert_eq!(
        peer.request(r#"{"id":5,"op":"ping"}"#),
        r#"{"id":5,"ok":true}"#
    );
}

#[test]
fn operations_use_the_key_prefix() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&server, &[]);
    assert!(
        agent.log().contains("connected to Redis"),
        "{}",
        agent.log()
    );
    let mut peer = agent.connect();
    let port = server.port;

    assert_eq!(
        peer.request(r#"{"id":1,"op":"ping"}"#),
        r#"{"id":1,"ok":true}"#
    );
    assert_eq!(
        peer.request(r#"{"id":1,"op":"get","key":"k"}"#),
        r#"{"id":1,"ok":true,"value":null}"#
    );
    assert_eq!(
        peer.request(r#"{"id":2,"op":"put","key":"k","value":"v"}"#),
        r#"{"id":2,"ok":true}"#
    );
    assert_eq!(
        peer.request(r#"{"id":3,"op":"get","key":"k"}"#),
        r#"{"id":3,"ok":true,"value":"v"}"#
    );
    // Stored under the prefix, and only there.
    assert_eq!(redis_command(port, &["EXISTS", "agent:k"]), ":1\r\n");
    assert_eq!(redis_command(port, &["GET", "agent:k"]), "$1\r\nv\r\n");
    assert_eq!(redis_command(port, &["EXISTS", "k"]), ":0\r\n");
    assert_eq!(redis_command(port, &["DBSIZE"]), ":1\r\n");

    assert_eq!(
        peer.request(r#"{"id":4,"op":"put","key":"k","value":"é\n2"}"#),
        r#"{"id":4,"ok":true}"#
    );
    assert_eq!(
        peer.request(r#"{"id":5,"op":"get","key":"k"}"#),
        r#"{"id":5,"ok":true,"value":"é\n2"}"#
    );
    assert_eq!(redis_command(port, &["STRLEN", "agent:k"]), ":4\r\n");
    assert_eq!(
        peer.request(r#"{"id":6,"op":"delete","key":"k"}"#),
        r#"{"id":6,"ok":true,"deleted":true}"#
    );
    assert_eq!(redis_command(port, &["EXISTS", "agent:k"]), ":0\r\n");
    assert_eq!(
        peer.request(r#"{"id":7,"op":"delete","key":"k"}"#),
        r#"{"id":7,"ok":true,"deleted":false}"#
    );
    assert_eq!(
        peer.request(r#"{"id":8,"op":"get","key":"k"}"#),
        r#"{"id":8,"ok":true,"value":null}"#
    );

    // Values written by others under the prefix are read back.
    assert_eq!(
        redis_command(port, &["SET", "agent:ext", "from redis"]),
        "+OK\r\n"
    );
    assert_eq!(
        peer.request(r#"{"id":9,"op":"get","key":"ext"}"#),
        r#"{"id":9,"ok":true,"value":"from redis"}"#
    );

    // Another prefix on the same server sees none of it.
    let other = redis_agent(&server, &[("AGENT_STORAGE__REDIS__KEY_PREFIX", "other:")]);
    let mut other_peer = other.connect();
    assert_eq!(
        other_peer.request(r#"{"id":1,"op":"get","key":"ext"}"#),
        r#"{"id":1,"ok":true,"value":null}"#
    );
    assert_eq!(
        other_peer.request(r#"{"id":2,"op":"put","key":"ext","value":"mine"}"#),
        r#"{"id":2,"ok":true}"#
    );
    assert_eq!(redis_command(port, &["GET", "other:ext"]), "$4\r\nmine\r\n");
    assert_eq!(
        peer.request(r#"{"id":10,"op":"get","key":"ext"}"#),
        r#"{"id":10,"ok":true,"value":"from redis"}"#
    );
}

#[test]
fn outage_gives_prompt_errors_and_recovers_without_restart() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&server, &[]);
    let mut peer = agent.connect();
    assert_eq!(
        peer.request(r#"{"id":1,"op":"put","key":"before","value":"1"}"#),
        r#"{"id":1,"ok":true}"#
    );

    server.stop();
    assert_prompt_storage_errors(&mut peer);
    // A second round: failures stay prompt, nothing piles up.
    assert_prompt_storage_errors(&mut peer);
    // A connection opened during the outage is served too.
    let mut late = agent.connect();
    assert_prompt_storage_errors(&mut late);

    // Same port, empty server (no persistence): the agent reconnects by itself.
    server.restart();
    let poll_failures = peer.wait_for_recovery();
    assert_eq!(
        peer.request(r#"{"id":2,"op":"get","key":"recovered"}"#),
        r#"{"id":2,"ok":true,"value":"yes"}"#
    );
    assert_eq!(
        peer.request(r#"{"id":3,"op":"get","key":"before"}"#),
        r#"{"id":3,"ok":true,"value":null}"#
    );
    assert_eq!(
        late.request(r#"{"id":4,"op":"put","key":"late","value":"ok"}"#),
        r#"{"id":4,"ok":true}"#
    );
    assert_eq!(
        redis_command(server.port, &["GET", "agent:late"]),
        "$2\r\nok\r\n"
    );

    // Each failed storage op was counted as a storage failure: 12 above,
    // plus those the recovery poll saw before Redis answered.
    let text = agent.scrape();
    let failed = sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "storage")]);
    assert_eq!(failed, Some((12 + poll_failures) as f64), "{text}");
}

#[test]
fn agent_started_while_redis_is_down_starts_and_recovers() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.stop();
    let agent = redis_agent(&server, &[]);
    let log = agent.log();
    let warning = log
        .lines()
        .find(|l| l.contains("unreachable"))
        .unwrap_or_else(|| panic!("no warning about Redis being unreachable:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");

    let mut peer = agent.connect();
    assert_prompt_storage_errors(&mut peer);

    server.restart();
    peer.wait_for_recovery();
    assert_eq!(
        peer.request(r#"{"id":1,"op":"get","key":"recovered"}"#),
        r#"{"id":1,"ok":true,"value":"yes"}"#
    );
    assert_eq!(
        redis_command(server.port, &["GET", "agent:recovered"]),
        "$3\r\nyes\r\n"
    );
}

#[test]
fn hung_redis_is_bounded_by_the_timeout() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&server, &[]);
    let mut peer = agent.connect();
    assert_eq!(
        peer.request(r#"{"id":1,"op":"put","key":"k","value":"v"}"#),
        r#"{"id":1,"ok":true}"#
    );

    // A paused server keeps its connections open but never answers: only the
    // timeout can end each command.
    server.pause();
    for (i, request) in [
        r#"{"id":2,"op":"get","key":"k"}"#,
        r#"{"id":3,"op":"delete","key":"k"}"#,
        r#"{"id":4,"op":"get","key":"k"}"#,
    ]
    .iter()
    .enumerate()
    {
        let (reply, took) = peer.timed_request(request);
        assert_eq!(
            reply,
            format!(
                r#"{{"id":{},"ok":false,"error":"storage timed out after 500ms"}}"#,
                i + 2
            )
        );
        assert!(
            took >= Duration::from_millis(450) && took < PROMPT,
            "{request} took {took:?}"
        );
    }
    assert_eq!(
        peer.request(r#"{"id":5,"op":"ping"}"#),
        r#"{"id":5,"ok":true}"#
    );

    server.resume();
    peer.wait_for_recovery();
    assert_eq!(
        peer.request(r#"{"id":6,"op":"get","key":"recovered"}"#),
        r#"{"id":6,"ok":true,"value":"yes"}"#
    );
}

/// The storage-failure lines of the log: (operation, suppressed count).
fn failure_lines(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("storage operation failed"))
        .map(|l| {
            let field = |name: &str| {
                l.split_once(&format!("{name}="))
                    .map(|(_, rest)| {
                        rest.split_whitespace()
                            .next()
                            .unwrap_or("")
                            .trim_matches('"')
                            .to_string()
                    })
                    .unwrap_or_default()
            };
            assert_eq!(field("backend"), "redis", "{l}");
            assert!(!field("error").is_empty(), "{l}");
            (field("operation"), field("suppressed").parse().unwrap_or(0))
        })
        .collect()
}

/// Issue #13: the StorageErrors runbook sends operators to the log, which
/// must give the failing operation, backend and error; an outage must not
/// flood it, and its end must be logged once.
#[test]
fn storage_failures_are_logged_rate_limited_and_the_recovery_once() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&redis, &[]);
    let mut peer = agent.connect();
    assert_eq!(peer.put("k", "v")["ok"], true);
    redis.stop();

    const FAILURES: usize = 40;
    let started = std::time::Instant::now();
    for _ in 0..FAILURES {
        let reply = peer.put("k", "v");
        assert_eq!(reply["ok"], false, "{reply}");
    }
    let elapsed = started.elapsed();
    let lines = failure_lines(&agent.log());
    // About one line a second, never one per failure.
    let most = elapsed.as_secs() as usize + 2;
    assert!(
        !lines.is_empty() && lines.len() <= most,
        "{} warn lines for {FAILURES} failures in {elapsed:?}:\n{}",
        lines.len(),
        agent.log()
    );
    assert!(lines.iter().all(|(op, _)| op == "put"), "{lines:?}");
    // The lines and the failures they held back add up to at most the total.
    let accounted: u64 = lines.iter().map(|(_, s)| s + 1).sum();
    assert!(accounted <= FAILURES as u64, "{lines:?}");

    redis.restart();
    let recovered = wait_until(|| peer.put("k", "back")["ok"] == true);
    assert!(recovered);
    let mut agent = agent;
    agent.wait_for_log("storage operations succeed again");
    let recoveries = |agent: &Agent| -> Vec<String> {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("storage operations succeed again"))
            .map(str::to_string)
            .collect()
    };
    // Recovery is logged per operation, once.
    let lines = recoveries(&agent);
    assert_eq!(lines.len(), 1, "{}", agent.log());
    assert!(lines[0].contains("operation=\"put\""), "{}", lines[0]);
    assert!(lines[0].contains("backend=\"redis\""), "{}", lines[0]);
    let failed: usize = lines[0]
        .split_once("failed_operations=")
        .and_then(|(_, n)| n.split_whitespace().next()?.parse().ok())
        .expect("failed_operations");
    // The 40, plus the puts that failed while Redis was coming back.
    assert!(failed >= FAILURES, "{}", lines[0]);
    // Further successes log nothing more.
    assert_eq!(peer.get("k")["value"], "back");
    assert_eq!(peer.put("k", "again")["ok"], true);
    assert_eq!(recoveries(&agent).len(), 1);
}

/// 20 puts in one write against a paused Redis. Each times out after
/// 500 ms, one after the other, so the last reply exists only after 10 s;
/// every earlier one is sent as soon as it exists (docs/protocol.md), not
/// held until no request is left to read.
#[test]
fn a_pipeline_under_a_stalled_redis_gets_each_reply_as_it_exists() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&server, &[]);
    let mut peer = agent.connect();
    assert_eq!(peer.put("k", "v")["ok"], true);
    server.pause();
    let pipeline: String = (0..20)
        .map(|i| format!("{{\"id\":{i},\"op\":\"put\",\"key\":\"p{i}\",\"value\":\"v\"}}\n"))
        .collect();
    let sent = Instant::now();
    peer.send_raw(pipeline.as_bytes());
    let mut arrivals = Vec::new();
    for i in 0..20u32 {
        let reply = peer.read_line().expect("a reply");
        let arrived = sent.elapsed();
        assert_eq!(
            reply,
            format!(r#"{{"id":{i},"ok":false,"error":"storage timed out after 500ms"}}"#)
        );
        // Reply i exists after i + 1 timeouts; it may arrive late on a
        // loaded machine, but not after the whole pipeline's 10 s.
        let ready = Duration::from_millis(500) * (i + 1);
        assert!(
            arrived >= ready - Duration::from_millis(50) && arrived < ready + PROMPT,
            "reply {i} arrived after {arrived:?}; it was ready after {ready:?}"
        );
        arrivals.push(arrived);
    }
    eprintln!(
        "replies arrived after {:?} (first), {:?} (tenth), {:?} (last)",
        arrivals[0], arrivals[9], arrivals[19]
    );
    server.resume();
    peer.wait_for_recovery();
}

/// A long pipeline over a few keys: every reply comes in the order of the
/// requests, and each request sees the effect of every earlier one on its
/// key.
#[test]
fn a_long_pipeline_keeps_its_order_and_its_effects() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(&server, &[]);
    let mut peer = agent.connect();
    // 600 requests in one write: puts, gets and deletes over 5 keys, in an
    // order where each get must see the put or delete just before it.
    let (mut pipeline, mut expected) = (String::new(), Vec::new());
    let mut values: [Option<String>; 5] = Default::default();
    for i in 0..600usize {
        let k = (i * 7) % 5;
        let key = format!("o{k}");
        match i % 3 {
            0 => {
                let value = format!("v{i}");
                pipeline += &format!(
                    "{{\"id\":{i},\"op\":\"put\",\"key\":\"{key}\",\"value\":\"{value}\"}}\n"
                );
                expected.push(format!(r#"{{"id":{i},"ok":true}}"#));
                values[k] = Some(value);
            }
            1 => {
                pipeline += &format!("{{\"id\":{i},\"op\":\"get\",\"key\":\"{key}\"}}\n");
                expected.push(match &values[k] {
                    Some(v) => format!(r#"{{"id":{i},"ok":true,"value":"{v}"}}"#),
                    None => format!(r#"{{"id":{i},"ok":true,"value":null}}"#),
                });
            }
            _ => {
                pipeline += &format!("{{\"id\":{i},\"op\":\"delete\",\"key\":\"{key}\"}}\n");
                let existed = values[k].take().is_some();
                expected.push(format!(r#"{{"id":{i},"ok":true,"deleted":{existed}}}"#));
            }
        }
    }
    peer.send_raw(pipeline.as_bytes());
    for want in &expected {
        assert_eq!(&peer.read_line().expect("a reply"), want);
    }
    wait_for_value(&agent, "messages_received_total", &[], 600.0);
}

/// SIGTERM while 4 peers each have 20 puts waiting on a paused Redis:
/// every request the agent read is answered before its connection closes.
/// Those that timed out within the drain time say so; those still waiting
/// at its end are answered `shutting down`.
#[test]
fn sigterm_answers_every_request_read_while_redis_is_stalled() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut agent = redis_agent(&server, &[]);
    let mut peers: Vec<Peer> = (0..4).map(|_| agent.connect()).collect();
    for peer in &mut peers {
        assert_eq!(peer.put("k", "v")["ok"], true);
    }
    server.pause();
    for (p, peer) in peers.iter_mut().enumerate() {
        let pipeline: String = (0..20)
            .map(|i| {
                format!("{{\"id\":{i},\"op\":\"put\",\"key\":\"s{p}-{i}\",\"value\":\"v\"}}\n")
            })
            .collect();
        peer.send_raw(pipeline.as_bytes());
    }
    // Each connection has read its pipeline once its first put is under way.
    wait_for_value(&agent, "messages_received_total", &[], 8.0);
    let signalled = Instant::now();
    let status = agent.terminate();
    eprintln!("exit {status:?} {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "{status:?}\n{}", agent.log());
    let (mut timed_out, mut shutting_down) = (0, 0);
    for peer in &mut peers {
        for i in 0..20 {
            let reply = peer
                .read_line()
                .unwrap_or_else(|| panic!("EOF before reply {i}:\n{}", agent.log()));
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
            assert_eq!((v["id"] == i, v["ok"] == false), (true, true), "{reply}");
            match v["error"].as_str() {
                Some("storage timed out after 500ms") => timed_out += 1,
                Some(e) if e.starts_with("shutting down: ") => shutting_down += 1,
                _ => panic!("{reply}"),
            }
        }
        assert_eq!(peer.read_line(), None, "EOF after the last reply");
    }
    eprintln!("{timed_out} timed out, {shutting_down} answered 'shutting down'");
    assert_eq!(timed_out + shutting_down, 80);
    assert!(shutting_down > 0 && timed_out > 0, "{}", agent.log());
    assert!(
        agent.log().contains("answering them 'shutting down'"),
        "{}",
        agent.log()
    );
    server.resume();
}

/// Gets of long values, pipelined, with a budget that holds one longest
/// reply: each get reserves it before it runs and gives it back once the
/// reply is written. Every reply arrives whole and in order.
#[test]
fn pipelined_long_gets_wait_their_turn_for_the_budget() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let agent = redis_agent(
        &server,
        &[
            ("AGENT_NETWORK__MAX_MESSAGE_BYTES", "200000"),
            ("AGENT_NETWORK__MAX_BUFFERED_BYTES", "200000"),
        ],
    );
    let mut peer = agent.connect();
    let value = |i: usize| format!("{i:03}").repeat(50_000);
    for i in 0..3 {
        assert_eq!(peer.put(&format!("long{i}"), &value(i))["ok"], true);
    }
    let pipeline: String = (0..30)
        .map(|i| format!("{{\"id\":{i},\"op\":\"get\",\"key\":\"long{}\"}}\n", i % 3))
        .collect();
    peer.send_raw(pipeline.as_bytes());
    for i in 0..30 {
        let reply: serde_json::Value =
            serde_json::from_str(&peer.read_line().expect("a reply")).unwrap();
        assert_eq!(reply["id"], i);
        assert_eq!(
            reply["value"].as_str(),
            Some(value(i % 3).as_str()),
            "reply {i}"
        );
    }
    wait_for_value(&agent, "messages_received_total", &[], 33.0);
}
