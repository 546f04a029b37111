//! SIGHUP reloads the configuration file, with the real binary: what can
//! change while serving is applied (log.level, network.peers,
//! metrics.allowed_networks), other changed keys are named as needing a
//! restart, and an invalid file is logged while the agent keeps serving.

mod common;

use common::*;

fn sighup(agent: &Agent) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
}

/// Sends SIGHUP and waits for the `n`-th reload outcome line.
fn reload(agent: &mut Agent, n: usize) {
    sighup(agent);
    let done = wait_until(|| {
        let log = agent.log();
        log.matches("configuration reloaded").count()
            + log.matches("configuration reload failed").count()
            >= n
    });
    assert!(done, "no reload outcome #{n}:\n{}", agent.log());
}

#[test]
fn sighup_applies_live_keys_names_the_others_and_survives_a_bad_file() {
    let other = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, "log:\n  level: info\n").unwrap();
    let mut agent = Agent::start_with(AgentOptions {
        args: vec!["-c".into(), file.display().to_string()],
        ..AgentOptions::default()
    });
    assert_eq!(agent.http_get("/metrics").status, 200);
    assert_eq!(
        sample(&agent.scrape(), "agent_peers_configured", &[]),
        Some(0.0)
    );
    assert!(!agent.log().contains("DEBUG"));

    // Reload 1: a peer, debug logging, an allow-list, and a key that needs a restart.
    std::fs::write(
        &file,
        format!(
            "log:\n  level: debug\nnetwork:\n  peers: [\"{}\"]\nstorage:\n  redis:\n    timeout: 5s\n",
            other.peer_addr
        ),
    )
    .unwrap();
    reload(&mut agent, 1);
    let connected =
        wait_until(|| sample(&other.scrape(), "agent_peers_connected", &[]) == Some(1.0));
    assert!(connected, "the new peer was not dialled:\n{}", agent.log());
    assert_eq!(
        sample(&agent.scrape(), "agent_peers_configured", &[]),
        Some(1.0)
    );
    agent.wait_for_log("DEBUG");
    let log = agent.log();
    assert!(
        log.contains("key=storage.redis.timeout") && log.contains("restart the agent to apply it"),
        "{log}"
    );
    assert!(!log.contains("key=log.level"), "{log}");

    // Reload 2: an invalid file is logged, and nothing changes.
    std::fs::write(&file, "log:\n  level: verbose\n").unwrap();
    reload(&mut agent, 2);
    let log = agent.log();
    assert!(
        log.contains("configuration reload failed; keeping the running configuration")
            && log.contains("log.level"),
        "{log}"
    );
    assert_eq!(agent.connect().put("k", "v")["ok"], true);
    assert_eq!(
        sample(&other.scrape(), "agent_peers_connected", &[]),
        Some(1.0)
    );

    // Reload 3: the peer removed, the metrics endpoint closed to us.
    std::fs::write(&file, "metrics:\n  allowed_networks: [10.0.0.0/8]\n").unwrap();
    reload(&mut agent, 3);
    let dropped = wait_until(|| sample(&other.scrape(), "agent_peers_connected", &[]) == Some(0.0));
    assert!(
        dropped,
        "the removed peer is still connected:\n{}",
        agent.log()
    );
    assert_eq!(agent.http_get("/metrics").status, 403);
    assert!(agent.log().contains("peer removed from network.peers"));
    // Still serving, and still alive.
    assert_eq!(agent.connect().get("k")["value"], "v");
    assert!(agent.terminate().success());
}

/// A configuration file truncated to nothing (or to comments) is not "all
/// defaults": the reload fails and the allow-list stays in force.
#[test]
fn a_reload_of_a_file_with_no_keys_keeps_the_running_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, "metrics:\n  allowed_networks: [10.0.0.0/8]\n").unwrap();
    let mut agent = Agent::start_with(AgentOptions {
        args: vec!["-c".into(), file.display().to_string()],
        ..AgentOptions::default()
    });
    assert_eq!(agent.http_get("/metrics").status, 403);
    for (n, text) in [(1, ""), (2, "# metrics:\n#   allowed_networks: []\n")] {
        std::fs::write(&file, text).unwrap();
        reload(&mut agent, n);
        let log = agent.log();
        assert!(
            log.matches("configuration reload failed; keeping the running configuration")
                .count()
                == n
                && log.contains("holds no keys"),
            "{log}"
        );
        assert!(!log.contains("configuration reloaded"), "{log}");
        assert_eq!(agent.http_get("/metrics").status, 403);
    }
    assert_eq!(agent.connect().put("k", "v")["ok"], true);
    assert!(agent.terminate().success());
}
