//! The smoke test every shipped binary passes: the release archives'
//! static musl build natively and the aarch64 build under qemu-user
//! (`.ci/run`, README "Platforms"), and this build in `cargo test`.
//!
//! `SMOKE_AGENT` names the binary to test, and `SMOKE_RUNNER` the command
//! that runs it (split on spaces, e.g. `qemu-aarch64 -L
//! /usr/aarch64-linux-gnu`); without them this build's binary runs as it is.

mod common;

use common::*;

/// The command that runs the binary under test.
fn program() -> Option<Vec<String>> {
    let agent = std::env::var("SMOKE_AGENT")
        .ok()
        .filter(|s| !s.is_empty())?;
    let mut program: Vec<String> = std::env::var("SMOKE_RUNNER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    program.push(agent);
    eprintln!("smoke test of: {}", program.join(" "));
    Some(program)
}

/// Puts, gets and deletes over TCP, then `/ready`, exact counters and
/// histogram counts on `/metrics`, and a clean exit on SIGTERM.
#[test]
fn serves_counts_exactly_and_stops_cleanly() {
    let mut agent = Agent::start_with(AgentOptions {
        program: program(),
        ..AgentOptions::default()
    });
    let ready = agent.http_get("/ready");
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (200, "OK\n"),
        "{ready:?}"
    );

    // 40 puts, 40 gets that find their value, 20 deletes, and a get of a
    // deleted key: 101 messages on one connection.
    let mut peer = agent.connect();
    peer.known_traffic(40, 40, 20, 0);
    assert_eq!(peer.get("k0")["value"], serde_json::Value::Null);
    drop(peer);

    let page = agent.scrape();
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&page, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{page}"))
    };
    assert_eq!(value("messages_received_total", &[]), 101.0);
    assert_eq!(
        value("message_processing_duration_seconds_count", &[]),
        101.0
    );
    for (op, n) in [("put", 40.0), ("get", 41.0), ("delete", 20.0)] {
        let labels = [("operation", op), ("backend", "local")];
        assert_eq!(value("storage_operations_total", &labels), n, "{op}");
        assert_eq!(
            value("storage_operation_duration_seconds_count", &labels),
            n,
            "{op}"
        );
        // Every sample lands in a bucket: the +Inf bucket holds them all,
        // and the sum of the durations is a real, positive number.
        let inf = [("operation", op), ("backend", "local"), ("le", "+Inf")];
        assert_eq!(value("storage_operation_duration_seconds_bucket", &inf), n);
        let sum = value("storage_operation_duration_seconds_sum", &labels);
        assert!(sum > 0.0 && sum.is_finite(), "{op}: sum {sum}");
    }
    let status = agent.terminate();
    assert!(status.success(), "exit status {status:?}:\n{}", agent.log());
}
