//! What the agent logs about its peer connections (issue #13): each inbound
//! connection's open and close at debug, with its duration and messages;
//! connections refused at network.max_connections at warn, at most one line
//! a minute with a count, however many arrive.

mod common;

use std::io::Read;

use common::*;

#[test]
fn inbound_connections_are_logged_at_debug_with_their_messages() {
    let mut agent = Agent::start_with(
        AgentOptions::default().env("AGENT_LOG__LEVEL", "info,agent::server=debug"),
    );
    let mut peer = agent.connect();
    assert_eq!(peer.put("a", "1")["ok"], true);
    assert_eq!(peer.get("a")["value"], "1");
    assert_eq!(peer.call(serde_json::json!({"op": "fly"}))["ok"], false);
    drop(peer);
    agent.wait_for_log("peer connection closed");
    let log = agent.log();
    let open: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("peer connection open"))
        .collect();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("peer connection closed"))
        .collect();
    assert_eq!((open.len(), closed.len()), (1, 1), "{log}");
    assert!(
        open[0].contains("DEBUG") && open[0].contains("remote=127.0.0.1:"),
        "{}",
        open[0]
    );
    assert!(
        closed[0].contains("messages=3") && closed[0].contains("duration="),
        "{}",
        closed[0]
    );
}

#[test]
fn refused_connections_are_warned_about_once_with_a_count() {
    let agent = Agent::start_with(AgentOptions::default().env("AGENT_NETWORK__MAX_CONNECTIONS", 1));
    // The one slot, held by a peer that has completed a request: it is not
    // evicted, so newcomers are refused.
    let mut holder = agent.connect();
    assert_eq!(holder.call(serde_json::json!({"op": "ping"}))["ok"], true);
    const REFUSED: usize = 20;
    for _ in 0..REFUSED {
        let mut peer = Peer::connect(agent.peer_addr);
        let mut buf = Vec::new();
        let _ = peer.reader.read_to_end(&mut buf);
        assert!(buf.is_empty());
    }
    let counted = wait_until(|| {
        sample(&agent.scrape(), "agent_connections_rejected_total", &[]) == Some(REFUSED as f64)
    });
    assert!(counted, "{}", agent.scrape());
    let log = agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("network.max_connections reached"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("max_connections=1"), "{}", warnings[0]);
    assert_eq!(holder.call(serde_json::json!({"op": "ping"}))["ok"], true);
}
